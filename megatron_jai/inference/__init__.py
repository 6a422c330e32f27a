"""Generation from our checkpoints and Hugging Face directories: loading at any TP/PP/EP
(:mod:`.lm`), the forward pass (:mod:`.forward`), the KV-cached decode loop and sampling
(:mod:`.generation`), chat prompts (:mod:`.chat`)."""
