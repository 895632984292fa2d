"""Former home of the SFT loop; kept so `from jaxlab.train.loop import run_sft` still works.
Every channel, SFT included, now runs through `jaxlab.train.runner.run`."""
from jaxlab.train.runner import (load_or_train_tokenizer, mesh_and_rules,  # noqa: F401
                                 model_config, run as run_sft)
