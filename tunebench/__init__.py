"""tunebench: fine-tune causal language models with several methods and compare them fairly."""
