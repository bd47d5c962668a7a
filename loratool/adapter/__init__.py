"""The LoRA adapter: the PEFT config built from the `lora` section and attached to the base, the
initializations (PiSSA, OLoRA, EVA, CorDA, LoftQ), AdaLoRA's rank budget, and reading adapter files."""
