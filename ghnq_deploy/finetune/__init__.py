"""``finetune``: quantization-aware training of one net, starting from its GHN-Q prediction."""
