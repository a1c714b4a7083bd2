"""How a config travels from deepy.py to every rank, and the shared command line.

deepy.py validates the merged YAML once and passes it to each rank as
``--neox_config <urlsafe base64 JSON>``, so all ranks rebuild identical arguments
without re-reading files that might differ between nodes. ``python train.py a.yml``
(no launcher) reads YAML files directly instead.
"""
import argparse
import os

import yaml

from megatron.config.loading import normalize_key, parse_yaml, yaml_problem
from megatron.config.neox_args import NEOX_CONFIG_FLAG, NeoXArgs
from megatron.errors import ConfigError

def config_parser(prog: str, with_script: bool) -> argparse.ArgumentParser:
    """Command line of deepy.py (``with_script``) and of train.py/eval.py."""
    p = argparse.ArgumentParser(prog=prog, description="GPT-NeoX-style YAML configs are "
                                "merged (a key may appear in only one file).")
    if with_script:
        p.add_argument("script", help="entry point to run on every rank, e.g. train.py")
    p.add_argument("configs", nargs="+", help="YAML config files")
    p.add_argument("-d", "--conf_dir", help="directory prefixed to every config path")
    p.add_argument("-H", "--hostfile", help="DeepSpeed hostfile (overrides the config)")
    p.add_argument("--eval_tasks", nargs="+", help="lm-eval tasks (eval.py)")
    p.add_argument("--num_fewshot", dest="eval_num_fewshot", type=int,
                   help="few-shot examples per lm-eval task (eval.py)")
    p.add_argument("--include_path", dest="eval_include_path",
                   help="folder of extra lm-eval task YAMLs (eval.py)")
    p.add_argument("--load", help="checkpoint directory to load (overrides the config)")
    p.add_argument("--iteration", type=int, help="checkpoint iteration to load")
    p.add_argument("--eval_results_prefix", help="prefix of the eval results file")
    for key in ("wandb_group", "wandb_team", "wandb_run_name"):
        p.add_argument(f"--{key}")
    p.add_argument("--override", nargs="+", default=[], metavar="KEY=VALUE",
                   help="set config keys last, over the files (VALUE is YAML; a dotted KEY "
                        "sets one entry of a block), e.g. --override train_iters=14300 "
                        "lr_decay_iters=14300 l2e.inhibition=none")
    return p


def config_paths(configs, conf_dir=None) -> list[str]:
    """NeoX's rule: ``-d DIR`` prefixes each path and ``.yml`` is added when missing."""
    paths = []
    for c in configs:
        if not c.endswith((".yml", ".yaml")):
            c += ".yml"
        paths.append(os.path.join(conf_dir, c) if conf_dir else c)
    return paths


def overrides_from(ns: argparse.Namespace) -> dict:
    keys = ("hostfile", "eval_tasks", "eval_num_fewshot", "eval_include_path", "load", "iteration",
            "eval_results_prefix", "wandb_group", "wandb_team", "wandb_run_name")
    out = {k: getattr(ns, k) for k in keys if getattr(ns, k) is not None}
    given = {normalize_key(k): f"--{k}" for k in out}
    for item in ns.override:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--override {item!r}: write KEY=VALUE, e.g. train_iters=14300")
        name = normalize_key(key)
        clash = [g for g in given if g == name or g.startswith(name + ".") or name.startswith(g + ".")]
        if clash:
            raise ConfigError(f"--override {item!r}: '{key}' is already set on the command line "
                              f"(by {given[clash[0]]}); give each key once")
        given[name] = f"--override {item}"
        try:
            out[key] = parse_yaml(value)
        except yaml.YAMLError as e:
            problem = yaml_problem(e).replace(" line 1:", "").strip()
            raise ConfigError(f"--override {item!r}: the value is not valid YAML ({problem}); "
                              f"fix the syntax or quote the whole KEY=VALUE for the shell") from None
    return out


def load_from_namespace(ns: argparse.Namespace) -> NeoXArgs:
    return NeoXArgs.from_ymls(config_paths(ns.configs, ns.conf_dir), overrides_from(ns))


def consume(argv=None, prog: str = "train.py") -> NeoXArgs:
    """Arguments of a rank: from ``--neox_config B64`` (deepy.py) or YAML paths.

    DeepSpeed's launcher appends ``--local_rank=N``; it is ignored (LOCAL_RANK is in
    the environment).
    """
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    argv = [a for a in argv if not a.startswith("--local_rank")]
    if NEOX_CONFIG_FLAG in argv:
        i = argv.index(NEOX_CONFIG_FLAG)
        if i + 1 >= len(argv):
            raise ConfigError(f"{NEOX_CONFIG_FLAG} needs a value")
        args = NeoXArgs.from_launch_argument(argv[i + 1])
    else:
        args = load_from_namespace(config_parser(prog, with_script=False).parse_args(argv))
    args.configure_world(world_size_from_env(args))
    return args


def world_size_from_env(args) -> int:
    """The world size this rank's launcher set up (megatron.parallel.distributed)."""
    from megatron.parallel.distributed import discover_rank

    return discover_rank(master_port=args.master_port).world_size
