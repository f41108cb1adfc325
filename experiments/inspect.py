"""Print, without training, where every parameter lives and the pipeline schedule; with
--target, the layout's memory per device and step time on that accelerator; with --search,
the layouts that fit it, fastest first (jaxmp/plan/planner.py, search.py).

    python -m experiments.inspect --preset=small --mesh=data:2,pipe:2,tensor:2 --microbatches=4
    python -m experiments.inspect --preset=xl --dtype=bfloat16 --vocab_size=50257 \
        --batch_size=512 --target=h100 --search --simulate_devices=64
"""

from __future__ import annotations

from absl import app, flags

from jaxmp.cli import flagtree
from jaxmp.cli.startup import parse_flags, run_guarded
from jaxmp.config import InspectConfig

F = flags.FLAGS
flagtree.define(InspectConfig)
flags.adopt_module_key_flags(flagtree)
flags.DEFINE_string("plot", None, "Also draw the schedule grid into this PNG (needs matplotlib).")


def plot(path: str, p: int, m: int, r: int, driven: bool = False, schedule: str = "") -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install -e '.[plot]' "
                         "(or pip install matplotlib)") from None
    from jaxmp import schedules, zerobubble
    from jaxmp.pipeline import bubble_fraction, timeline
    from jaxmp.scheduled import grid_cells

    zb = schedule == "zb"
    grid = (zerobubble.grid_cells(p, m) if zb else grid_cells(p, m, r) if driven
            else timeline(p, m, r))
    ticks = len(grid[0])
    fig, ax = plt.subplots(figsize=(max(6, ticks * 0.5), 0.6 * p + 1.2))
    cmap = plt.get_cmap("tab10")
    for s, row in enumerate(grid):
        for t, cell in enumerate(row):
            if cell == ".":
                color = "white"
            else:
                b = int(cell[1:].split(".")[0])
                color = cmap(b % 10)
            ax.add_patch(plt.Rectangle((t, p - 1 - s), 1, 1, facecolor=color, edgecolor="grey",
                                       alpha=1.0 if cell.startswith("F") or cell == "." else 0.55))
            if cell != ".":
                ax.text(t + 0.5, p - 0.5 - s, cell, ha="center", va="center", fontsize=7)
    ax.set_xlim(0, ticks)
    ax.set_ylim(0, p)
    ax.set_yticks([p - 0.5 - s for s in range(p)], [f"stage {s}" for s in range(p)])
    ax.set_xlabel("slot (F = forward, B = input gradient, W = weight gradient, blank = bubble)"
                  if zb else "tick (F = forward, B = backward, blank = bubble)")
    bubble = schedules.simulate("zb", p, m).bubble() if zb else bubble_fraction(p, m, r)
    ax.set_title(f"p={p} m={m} r={r} {schedule}: bubble fraction {bubble:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv: list[str]) -> int:
    return run_guarded(argv, inspect)


def inspect() -> None:
    """Print the plan and, with a pipe axis, the schedule grid; with --target, memory and
    step time on that accelerator; with --search, the layouts that fit, fastest first."""
    from jaxmp import zerobubble
    from jaxmp.mesh import format_mesh
    from jaxmp.pipeline import format_timeline, stage_layers
    from jaxmp.run import layout, make_trainer, model_config
    from jaxmp.run.console import check_writable
    from jaxmp.scheduled import format_grid

    if F.plot:
        check_writable(F.plot, "plot", directory=False)
    tree = flagtree.build(InspectConfig)
    cfg = tree.run_config()
    card = target_of(tree)
    if tree.plan.search:
        return search(tree, card)
    family, model_cfg = model_config(cfg)
    mesh, pipe, rules = layout(cfg, family, model_cfg)
    pipe.validate(model_cfg.num_layers, what=family.layers_name)
    trainer = make_trainer(cfg, family, model_cfg, mesh, pipe, rules)
    print(f"{family.name} on {format_mesh(mesh)}")
    print(trainer.plan().format())
    rest = "split over data, fsdp and context" if cfg.layout.shard_state else "--noshard_state"
    print(f"train state between steps (parameters + Adam moments, {rest}): "
          f"{trainer.state_bytes_per_device():,} bytes per device")
    if pipe.enabled:
        print(f"\npipeline: p={pipe.stages} stages, m={pipe.microbatches} micro-batches, "
              f"r={pipe.repeats} repeat(s), schedule {pipe.schedule}")
        for s, layers in enumerate(stage_layers(model_cfg.num_layers, pipe)):
            print(f"  stage {s}: layers {layers}")
        if pipe.schedule == "zb":
            print(zerobubble.format_grid(pipe.stages, pipe.microbatches))
        elif pipe.drives_backward:
            print(format_grid(pipe.stages, pipe.microbatches, pipe.repeats))
        else:
            print(format_timeline(pipe.stages, pipe.microbatches, pipe.repeats))
    else:
        print("\nno pipe axis: every layer runs on every device (no pipeline schedule)")
    if F.plot:
        plot(F.plot, pipe.stages, pipe.microbatches, pipe.repeats, pipe.drives_backward,
             pipe.schedule)
    if card is not None:
        from jaxmp.plan.planner import plan

        print()
        print(plan(cfg, card, tree.plan.plan_depth).format())


def target_of(tree: InspectConfig):
    """The --target accelerator with the plan flags applied (None without --target)."""
    import jax

    from jaxmp.plan.planner import target

    p = tree.plan
    if p.target is None:
        if p.search:
            raise ValueError("search needs a target accelerator: add --target=h100 (or h200, "
                             "a100, cpu)")
        return None
    for name in ("search_top", "search_compiles"):
        if getattr(p, name) < 1:
            raise ValueError(f"{name}={getattr(p, name)} must be >= 1")
    return target(p.target, len(jax.devices()), memory_gib=p.target_memory_gib,
                  efficiency=p.efficiency, devices_per_host=p.gpus_per_host)


def search(tree: InspectConfig, card) -> None:
    import jax

    from jaxmp.plan.planner import size
    from jaxmp.plan.search import search as run_search

    n = len(jax.devices())
    cfg = tree.run_config()
    print(f"searching layouts of {n} x {card.name} for batch {cfg.data.batch_size} "
          f"(model {cfg.model.family} {cfg.model.preset}; {size(card.memory_bytes)} "
          f"per device)", flush=True)
    found = run_search(cfg, card, n, top=tree.plan.search_top,
                       max_compiles=tree.plan.search_compiles, depth=tree.plan.plan_depth)
    print(found.format(tree.plan.search_top))
    if found.found:
        print("\nfastest, in full:")
        print(found.found[0][1].format())


def console() -> None:
    """The `jaxmp-inspect` console script (pyproject's [project.scripts])."""
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    console()
