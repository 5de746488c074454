"""`mcomp world generate`: write the synthetic world (media, training data, the MCUB-style benchmark)."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "world", help="generate the synthetic world: rendered media, training data and an MCUB-style benchmark"
    )
    p.add_argument("action", choices=("generate",), help="generate (or reuse) the world in --out")
    p.add_argument(
        "--out", required=True, help="the world's folder (an existing world of the same seed and config is reused)"
    )
    p.add_argument(
        "--size", default="full", help="full, test, or a world YAML (configs/world/<size>.yaml; default full)"
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of every random choice; the same seed gives the same bytes (default 0)",
    )
    p.add_argument(
        "--modality",
        action="append",
        metavar="FILE",
        help="add the modality of a modality file (docs/adding_a_modality.md) to the built-in four; repeatable",
    )
    p.add_argument("--workers", type=int, help="render threads (default: 1 for small worlds, else up to 2)")
    p.add_argument("--force", action="store_true", help="render anew even where a matching world is there")
    p.set_defaults(func=run)


def run(args) -> int:
    from mcomp.commands.zoo import zoo_modalities
    from mcomp.world import generate_world
    from mcomp.world.generate import MANIFEST

    modalities = zoo_modalities(args)
    world = generate_world(
        args.out, size=args.size, seed=args.seed, modalities=modalities, workers=args.workers, force=args.force
    )
    print(f"world {world.size} (seed {world.seed}, config {world.config_digest}) at {world.root}")
    for split, root in sorted(world.data.get("mcub", {}).items()):
        print(f"  benchmark ({split}): mcomp eval --task mcub4 --data-root {world.path(root)} ...")
    print(f"  {len(world.files)} files; manifest: {world.root / MANIFEST}")
    return 0
