"""tunebench: fine-tune causal language models with several methods and compare them fairly."""
from tunebench.quiet import silence_third_party_noise

# Before any entry point imports transformers, peft, accelerate, DeepSpeed or bitsandbytes.
silence_third_party_noise()
