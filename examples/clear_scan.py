"""CLEAR on a sample-targeted backdoor: train a Swiss-roll model whose training set carries 20
relabelled copies of one random sample (the paper's label flip, end to end), scan it and a clean
model of the same task, then patch the attacked one.

    python examples/clear_scan.py            # about 15 s on one CPU core
"""
import medic_fast
from medic_fast.zoo.tasks import make_task

# Seed 2 of the evaluation seeds (benchmarks/RESULTS.md §4): the attack takes there.
attacked = make_task("swiss_roll", "label_flip", "end2end", seed=2)
clean = make_task("swiss_roll", "label_flip", "end2end", seed=2, poisoned=False)
print(f"attack: sample of class {attacked.source} -> class {attacked.target}; took: "
      f"{attacked.took} (the model says {attacked.target_class()})")

for name, task in (("attacked", attacked), ("clean", clean)):
    report = medic_fast.scan(task.model, task.val)      # the default search (method="hull")
    print(f"{name:8s} {report!r}")
    print(f"         deepest pocket per class pair (P):\n{report.P}")
    if name == "attacked":
        patched = medic_fast.patch(task.model, report, task.val)
        print(f"after patch the sample is class {attacked.target_class(patched)}; test accuracy "
              f"{attacked.accuracy():.3f} -> {attacked.accuracy(patched):.3f}")
