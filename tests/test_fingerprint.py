"""The tables fingerprint: a hash of every seed's tables, stable under a copied or renamed
results folder, changed by any byte of any table."""

from __future__ import annotations

import shutil

import pytest

from sacpo_steps.core.errors import InputError
from sacpo_steps.reporting.fingerprint import fingerprint, main


def _experiment(root, seeds=(0, 1)):
    for seed in seeds:
        tables = root / f"seed-{seed}" / "tables"
        tables.mkdir(parents=True)
        (tables / "winrate.csv").write_text(f"model,winrate\ndpo_h,0.8{seed}\n")
        (tables / "elo.csv").write_text(f"model,elo\ndpo_h,11{seed}0\n")
        (tables / "battles.csv").write_text("model,opponent,score\ndpo_h,sft,1\n")
    return root


def test_the_fingerprint_covers_every_table_and_moves_with_the_folder(tmp_path):
    first = fingerprint(_experiment(tmp_path / "a"))
    assert len(first["files"]) == 6 and first["trained_under"] is None
    copy = tmp_path / "elsewhere" / "renamed"
    shutil.copytree(tmp_path / "a", copy)
    assert fingerprint(copy)["fingerprint"] == first["fingerprint"]
    (copy / "seed-1" / "tables" / "elo.csv").write_text("model,elo\ndpo_h,1111\n")
    changed = fingerprint(copy)
    assert changed["fingerprint"] != first["fingerprint"]
    assert changed["files"]["seed-0/tables/elo.csv"] == first["files"]["seed-0/tables/elo.csv"]
    assert changed["files"]["seed-1/tables/elo.csv"] != first["files"]["seed-1/tables/elo.csv"]


def test_a_folder_without_tables_is_refused_and_the_cli_prints_the_hash(tmp_path, capsys):
    with pytest.raises(InputError, match="no tables"):
        fingerprint(tmp_path)
    root = _experiment(tmp_path / "b", seeds=(0,))
    main([str(root)])
    assert f"tables fingerprint: {fingerprint(root)['fingerprint']}" in capsys.readouterr().out
