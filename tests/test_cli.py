import subprocess
import sys

from poslab import pe
from poslab.cli import main


def test_list_prints_every_encoding_with_its_paper(capsys):
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(pe.names())
    for name, line in zip(pe.names(), lines):
        assert line.split()[0] == name
        assert "arXiv" in line


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "poslab", "list"], capture_output=True, text=True, check=True)
    assert "rope" in out.stdout
