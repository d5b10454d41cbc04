"""MEDIC in a plain accelerate loop: the Cloner on an accelerate-prepared tiny GPT-2.

Runs on CPU in seconds, downloads nothing (pip install -e ".[hf]"); `accelerate launch` runs the
same script on several GPUs (the prepared student is the DDP wrapper the Cloner trains).
"""
import accelerate
import torch
import transformers

import medic_fast

V, T = 100, 16
cfg = transformers.GPT2Config(vocab_size=V, n_positions=T, n_embd=32, n_layer=2, n_head=2)
torch.manual_seed(0)
teacher = transformers.GPT2LMHeadModel(cfg).eval().requires_grad_(False)  # the trojaned model
student = transformers.GPT2LMHeadModel(cfg)                                # the clone to train
ids = torch.randint(0, V, (64, T))
data = [{"input_ids": x, "attention_mask": torch.ones(T, dtype=torch.long), "labels": x}
        for x in ids]
loader = torch.utils.data.DataLoader(data, batch_size=8)
stats = medic_fast.collect_stats(teacher, loader, "blocks")

accelerator = accelerate.Accelerator()
optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
student, optimizer, loader = accelerator.prepare(student, optimizer, loader)
cloner = medic_fast.Cloner(teacher.to(accelerator.device), student, "blocks", stats,
                           tau=5.0, lam=10.0)
for step, batch in enumerate(loader):
    loss = cloner(batch)
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad()
    accelerator.print(f"step {step}: ce {cloner.last.ce.item():.3f} "
                      f"clone {cloner.last.clone.item():.3f}")
