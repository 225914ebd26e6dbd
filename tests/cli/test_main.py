import subprocess
import sys

from typer.testing import CliRunner

from medgen.cli.main import app


def test_version_and_help():
    runner = CliRunner()
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and "medgen" in r.stdout
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0


def test_help_does_not_import_torch():
    code = "import sys; from medgen.cli.main import app; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_command_is_usage_error():
    r = CliRunner().invoke(app, ["no-such-command"])
    assert r.exit_code == 2
