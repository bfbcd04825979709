"""ExFM on streaming data: teacher (FM) training with snapshots, the data augmentation service
(DAS) that logs one FM prediction per example, and students (VMs) that distil from the log.

Entry points (each runs its own one-rank process group): ``run_exfm`` (everything, from one
config), ``run_teacher``, ``run_augment``, ``run_student``; ``dmtrec.bench.exfm.bench_exfm``.
"""
