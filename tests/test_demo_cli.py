"""`dcvit demo` refuses bad fairness settings in one line, before training or writing anything."""
from dcvit_engine.cli import main


def test_bad_seeds_targets_and_augment_write_nothing(tmp_path, capsys):
    base = ["demo", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
    assert main(base + ["--seeds", "0"]) == 2
    assert "--seeds must be at least 1" in capsys.readouterr().err
    # PRACTISE drops all four candidate blocks of the 6-block teacher at 0.4: DC-ViT has no fifth
    assert main(base + ["--targets", "0.9,0.4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "target 0.40 has no equal-MACs pair" in err and "\n" not in err
    assert main(base + ["--augment", "mixup"]) == 2
    assert "--augment must be one of" in capsys.readouterr().err
    assert main(base + ["--depth", "2"]) == 2
    assert "--depth must be at least 3" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
