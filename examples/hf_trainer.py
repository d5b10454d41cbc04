"""MEDIC under the Hugging Face Trainer: CloneTrainer on tiny GPT-2 models built from a config.

Runs on CPU in seconds, downloads nothing (pip install -e ".[hf]"). Replace the two models with
your trojaned teacher and its clone (e.g. from_pretrained) and the dataset with yours.
"""
import tempfile

import torch
import transformers

import medic_fast
from medic_fast.integrations.hf import CloneTrainer

V, T = 100, 16
cfg = transformers.GPT2Config(vocab_size=V, n_positions=T, n_embd=32, n_layer=2, n_head=2)
torch.manual_seed(0)
teacher = transformers.GPT2LMHeadModel(cfg).eval().requires_grad_(False)  # the trojaned model
student = transformers.GPT2LMHeadModel(cfg)                                # the clone to train


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n):
        self.ids = torch.randint(0, V, (n, T))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(T, dtype=torch.long),
                "labels": self.ids[i]}


train, held_out = Tokens(64), Tokens(16)
loader = torch.utils.data.DataLoader(train, batch_size=8)
stats = medic_fast.collect_stats(teacher, loader, "blocks")  # the teacher's transformer.h.*

with tempfile.TemporaryDirectory() as out:
    args = transformers.TrainingArguments(output_dir=out, use_cpu=True, report_to=[],
                                          per_device_train_batch_size=4,
                                          gradient_accumulation_steps=2, num_train_epochs=1,
                                          learning_rate=1e-3, logging_steps=4, save_strategy="no")
    trainer = CloneTrainer(model=student, args=args, train_dataset=train, eval_dataset=held_out,
                           teacher=teacher, stats=stats, layers="blocks", tau=5.0, lam=10.0)
    trainer.train()
    print("eval:", trainer.evaluate())
    print("last step: ce", trainer.cloner.last.ce.item(), "clone", trainer.cloner.last.clone.item())
    trainer.save_model(out + "/clone")  # a normal save_pretrained directory (tied weights kept)
