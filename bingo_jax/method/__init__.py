"""The method, one step of it: losses (``losses``), losses by name (``objectives``), CutMix
(``cutmix``), config checks (``config_checks``), the optimizer (``optimization``), the step
skeleton (``train_step``), the teacher's keys (``teacher_keys``), the BINGO and MoCo v2 steps
(``distill_step``, ``moco_step``) and the step a config asks for (``steps``).

May import: configs, data, models.
"""
