"""Sampling: KV-cache sampler (pure, jittable) and a host-side bucketing wrapper."""
from jaxlab.sample.engine import Completion, Sampler, bucket_length
from jaxlab.sample.sampler import SampleOutput, sample
