"""Pretrain a GPT-NeoX model: ``python deepy.py train.py CONFIG...`` or ``python train.py CONFIG...``."""
import sys

from megatron.errors import cli_main


@cli_main
def main(argv=None):
    from megatron.config import consume_launch_args
    from megatron.console import route_console_output
    from megatron.processes import keep_running_without_output
    from megatron.training import pretrain
    from megatron.training.robustness import PreemptionHandler

    route_console_output()  # config warnings once (rank 0), before the config is read
    keep_running_without_output()
    if pretrain(consume_launch_args(sys.argv[1:] if argv is None else argv))["stopped_by_signal"]:
        PreemptionHandler.ignore_repeats()


if __name__ == "__main__":
    main()
