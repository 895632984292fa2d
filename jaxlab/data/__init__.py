"""Data stage: chat JSONL -> chat template -> token ids + loss mask -> padded/packed batches."""

from jaxlab.data.batching import (
    SFTBatches, apply_overlong, first_fit, load_sft_examples, make_batch)
from jaxlab.data.chat import Conversation, encode_chat, end_of_turn_ids, pad_id, read_chat_jsonl
from jaxlab.data.errors import DataError
from jaxlab.data.tokenizer import CHATML_TEMPLATE, train_chat_tokenizer
