"""CloneTrainer (medic_fast.integrations.hf) and the accelerate recipe on a tiny GPT-2 (and
Llama) built from a config, on CPU, one process: training steps, gradient accumulation 2 against
1, evaluate(), save_model + from_pretrained with tied weights, and the Cloner on an
accelerate-prepared model."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed "
                                   "(pip install medic-fast[hf])")
pytest.importorskip("accelerate", reason="accelerate is not installed (pip install medic-fast[hf])")

from medic_fast.integrations.hf import CloneTrainer  # noqa: E402
from medic_fast.medic.cloner import Cloner  # noqa: E402
from medic_fast.stats import collect_stats  # noqa: E402
from shared import TINY_VOCAB, tiny_gpt2, tiny_llama  # noqa: E402

V, T = TINY_VOCAB, 8
LAYERS = ["transformer.h.0", "transformer.h.1"]


MODELS = {"gpt2": tiny_gpt2, "llama": tiny_llama}


class Rows(torch.utils.data.Dataset):
    """n examples of dicts of tensors (no padding: every micro-batch has as many labels)."""

    def __init__(self, n, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, V, (n, T), generator=gen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


class PaddedRows(Rows):
    """Rows right-padded to unequal lengths (labels -100 and mask 0 on the padding): the two
    halves of 4 rows hold 2 + 7 and 8 + 8 real tokens."""

    LENGTHS = (2, 7, 8, 8)

    def __getitem__(self, i):
        item = super().__getitem__(i)
        pad = torch.arange(T) >= self.LENGTHS[i % len(self.LENGTHS)]
        item["attention_mask"][pad] = 0
        item["labels"][pad] = -100
        return item


def _stats(teacher, layers=LAYERS):
    data = Rows(8, seed=1)
    batches = [{k: torch.stack([data[i][k] for i in range(j, j + 4)]) for k in data[0]}
               for j in (0, 4)]
    return collect_stats(teacher, batches, layers)


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no",
                logging_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def _trainer(tmp_path, student=None, teacher=None, arch="gpt2", **kw):
    """A CloneTrainer on GPT-2 (its two blocks by name) or Llama (``layers="blocks"``)."""
    teacher = teacher if teacher is not None else MODELS[arch](0)
    student = student if student is not None else MODELS[arch](1)
    layers = LAYERS if arch == "gpt2" else "blocks"
    data = kw.pop("train_dataset", Rows(8))
    return CloneTrainer(model=student, args=_args(tmp_path, **kw), train_dataset=data,
                        eval_dataset=Rows(4, seed=3), teacher=teacher,
                        stats=_stats(teacher, layers), layers=layers, tau=5.0, lam=10.0)


def test_import_medic_fast_does_not_import_transformers():
    import subprocess
    import sys
    code = ("import sys, medic_fast, medic_fast.integrations; "
            "assert 'transformers' not in sys.modules and 'accelerate' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("arch", list(MODELS))
def test_trains_and_leaves_the_teacher_untouched(tmp_path, arch):
    teacher = MODELS[arch](0)
    state = copy.deepcopy(teacher.state_dict())
    trainer = _trainer(tmp_path, teacher=teacher, arch=arch, per_device_train_batch_size=4,
                       max_steps=6, learning_rate=1e-2)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        first = trainer.compute_loss(trainer.model.train(), batch).item()
    out = trainer.train()
    assert torch.isfinite(torch.tensor(out.training_loss))
    last = trainer.cloner.last
    assert torch.isfinite(last.ce) and torch.isfinite(last.clone) and last.clone > 0
    with torch.no_grad():
        after = trainer.compute_loss(trainer.model.train(), batch).item()
    assert after < first
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.model.parameters()))
    assert all(torch.equal(state[k], v) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("data", [Rows, PaddedRows], ids=["equal", "unequal"])
@pytest.mark.parametrize("arch", list(MODELS))
def test_gradient_accumulation_matches_one_full_batch(tmp_path, arch, data):
    """Two micro-batches give the full batch's update, also with unequal numbers of tokens
    (num_items_in_batch for the CE, the rows' shares for the clone loss)."""
    params = {}
    for accum in (1, 2):
        trainer = _trainer(tmp_path / str(accum), arch=arch,
                           per_device_train_batch_size=4 // accum,
                           gradient_accumulation_steps=accum, max_steps=1, learning_rate=1e-2,
                           optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0,
                           train_dataset=data(4))
        trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(
            trainer.train_dataset)
        start = [p.detach().clone() for p in trainer.model.parameters()]
        trainer.train()
        params[accum] = [p.detach() - s for p, s in zip(trainer.model.parameters(), start)]
    assert any(d.abs().max() > 1e-6 for d in params[1])
    for a, b in zip(params[1], params[2]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)


def test_evaluate_returns_eval_loss(tmp_path):
    trainer = _trainer(tmp_path, per_device_eval_batch_size=2)
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics and torch.isfinite(torch.tensor(metrics["eval_loss"]))
    out = trainer.predict(Rows(2, seed=4))
    logits = out.predictions[0] if isinstance(out.predictions, tuple) else out.predictions
    assert logits.shape == (2, T, V)


def test_save_model_with_tied_weights_reloads_the_same_logits(tmp_path):
    trainer = _trainer(tmp_path / "run", per_device_train_batch_size=4, max_steps=2,
                       learning_rate=1e-2)
    trainer.train()
    student = trainer.model.eval()
    assert student.lm_head.weight is student.transformer.wte.weight
    trainer.save_model(str(tmp_path / "saved"))
    again = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "saved")).eval()
    assert again.lm_head.weight.data_ptr() == again.transformer.wte.weight.data_ptr()
    ids = Rows(2, seed=5).ids
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, student(ids).logits)


def test_rebuilds_the_cloner_for_a_wrapped_model(tmp_path):
    trainer = _trainer(tmp_path)
    wrapped = torch.nn.DataParallel(trainer.model)  # stands for the DDP wrapper Trainer makes
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.compute_loss(wrapped, batch)
    assert trainer.cloner.student is wrapped


def test_cloner_with_an_accelerate_prepared_model():
    import accelerate
    accelerator = accelerate.Accelerator(cpu=True)
    teacher, student = tiny_gpt2(0).eval().requires_grad_(False), tiny_gpt2(1)
    data = Rows(8)
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    opt = torch.optim.SGD(student.parameters(), lr=1e-2)
    student, opt, loader = accelerator.prepare(student, opt, loader)
    cloner = Cloner(teacher, student, LAYERS, _stats(teacher), tau=5.0, lam=10.0)
    for batch in loader:
        loss = cloner(batch)
        assert torch.isfinite(loss)
        opt.zero_grad()
        accelerator.backward(loss)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
        opt.step()
    assert all(p.grad is None for p in teacher.parameters())
