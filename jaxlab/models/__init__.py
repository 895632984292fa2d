"""Model definitions and checkpoint interop."""
from jaxlab.models.config import LoraConfig, ModelConfig
from jaxlab.models.decoder import Decoder
