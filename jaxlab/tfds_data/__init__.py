"""Datasets as TFDS builders (array_record, no TensorFlow) read through grain.

`builders` defines the TFDS builders (EM training sets, the study's cells, any chat JSONL
folder); `loader` turns a prepared split into a streaming, per-host, checkpointable batch
iterator with the interface of `jaxlab.data.batching.SFTBatches`.
"""
