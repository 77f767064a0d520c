# Reasoning SFT of the nano Puzzle child (paper sec. 4) with position gaps, the one setting of the
# nano recipe that is not the paper's (sft.py's other defaults are the nano recipe's already).
#   python sft.py config/nano_sft_cpu.py
# RoPE positions of each turn (user, assistant) start 0..pos_gap (uniform) past the turn before it,
# so no step of a trace can find its operand by distance alone and must look it up by its letter.
# Seed 1337's child, SFT taught k <= 6 (and 1% k = 7..8), 2 epochs, greedy k = 9 / 10 / 11 / 12:
# pos_gap 0: 40 / 20 / 10 / 10% (chance: 10); 24: 100 / 97 / 63 / 33% (data.py, the trace block);
# 48 (before the trace's closing line): k = 8 fell to 63%. SFT taught k <= 8, 4 epochs, whole runs:
# 24: seeds 2, 3 converged, seed 1337's traces past k = 8 ran away (97.9% think blocks); 32: seed
# 1337 99.9%, but seeds 2, 3 rose 3.1 / 2.8 points in the last third (README).
pos_gap = 24
