"""Planning a run before it runs: compile its program for a target accelerator on this
host and read what it needs (memory per device, FLOPs, collectives by kind and axis),
then predict the step (`experiments.inspect --target`, `--search`).

Modules: planner (one layout's plan), search (every layout of a device count), analysis
(the compiled program's figures), hlo (an HLO text parser), weightflow (where the
weights' bytes go in a program: gathers, reductions, copies).
"""
