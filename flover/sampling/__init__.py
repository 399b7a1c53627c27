"""Per-row token selection for a fused batch: sampler, penalties and logprobs, beam search."""
