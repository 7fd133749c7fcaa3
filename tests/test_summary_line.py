"""The summary line starts a line of its own, also below a live progress bar."""

from __future__ import annotations

import sys

from green_callbacks.outputs import say


def test_the_summary_clears_a_live_bar_and_starts_its_own_line(capsys):
    from tqdm import tqdm

    bar = tqdm(total=10, file=sys.stderr, ascii=True, bar_format="{n}/{total}")
    bar.update(3)
    capsys.readouterr()
    say("green-callbacks [finished]: 2 epochs")
    out, err = capsys.readouterr()
    bar.close()
    assert out == "\ngreen-callbacks [finished]: 2 epochs\n"
    assert err.startswith("\r"), "the live bar was wiped before the line was written"
    assert "3/10" in err, "and drawn again after it"


def test_without_tqdm_a_newline_still_comes_first(capsys, monkeypatch):
    monkeypatch.delitem(sys.modules, "tqdm", raising=False)
    say("green-callbacks [killed]: 0 epochs")
    assert capsys.readouterr().out == "\ngreen-callbacks [killed]: 0 epochs\n"
