"""Training (imported as ``diffattn.lora``): accelerate + peft trainers for LoRA length extension
with sparse attention in the loop, and CLEAR distillation. The package exists so the layout of the
product card holds; the trainers land with their own issue."""
