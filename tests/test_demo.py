"""`observe-r1 demo` (what `make demo` and the CPU image run): every step is a command line its own
subcommand accepts, with configs and overrides that load. The demo itself runs in `make demo` (about 4
minutes); each step's behaviour is tested where that subcommand is."""

from pathlib import Path

from observe_r1.cli import build_parser
from observe_r1.demo import steps
from observe_r1_eval.run import run_parser
from observe_r1_train.config import load_training_config
from observe_r1_train.ladder.cli import overrides
from observe_r1_train.ladder.config import load_ladder_config
from observe_r1_train.sft import load_sft_config


def test_every_step_is_a_valid_command_line(tmp_path):
    commands = steps(tmp_path, 8765)
    assert list(commands) == [
        "tiny-model",
        "synth-data",
        "chat",
        "sft",
        "ladder",
        "train",
        "serve",
        "ask",
        "eval",
    ]
    parser = build_parser()
    for name, argv in commands.items():
        assert argv[0] == name
        if name == "eval":  # parses its own arguments
            args = run_parser().parse_args(argv[1:])
            assert (
                args.base_url == "http://127.0.0.1:8765/v1"
                and args.local_data == tmp_path / "data" / "data.jsonl"
            )
        else:
            parser.parse_args(argv)


def test_the_training_steps_load_their_packaged_configs_with_the_overrides(tmp_path):
    commands = steps(tmp_path, 8765)
    sft = load_sft_config(Path(commands["sft"][2]), commands["sft"][3:])
    grpo = load_training_config(Path(commands["train"][2]), commands["train"][3:])
    assert Path(sft.model.path) == tmp_path / "model"
    assert Path(grpo.model.path) == tmp_path / "sft" / "model"  # GRPO starts from the warm start
    # The ladder samples the warm-started model (a random one is never right) and GRPO reads its ladder.
    ladder_args = build_parser().parse_args(commands["ladder"])
    ladder = load_ladder_config(None, overrides(ladder_args))
    assert Path(ladder.reference.model) == tmp_path / "sft" / "model"
    assert ladder.input.paths == [tmp_path / "data" / "data.jsonl"] and ladder.preset == "neuraladder"
    assert [Path(p) for p in grpo.data.paths] == [tmp_path / "ladder" / "ladder.jsonl"]
    assert Path(grpo.checkpoint.output_dir) == tmp_path / "train"
    served = commands["serve"][commands["serve"].index("--model") + 1]
    assert Path(served) == tmp_path / "train" / "model"  # the server loads what training exported
