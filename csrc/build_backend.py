"""The build backend pyproject.toml names: setuptools' own (``setuptools.build_meta``) with two
additions for ``pip install [--no-build-isolation] [-e] .``:

- without setuptools (``--no-build-isolation`` builds with what is installed, and a Python 3.12+
  virtualenv has none), or with one too old to build a wheel (the setuptools 65 of a Python
  3.10/3.11 virtualenv, without ``wheel``), the install stops with one message saying what to
  install, not a traceback;
- a wheel or editable build ends with one line saying whether ``xtk._C`` was built and, if not, why
  (``csrc/build.py: status_line``).

pip shows a build backend's output only with ``-v`` or when the build fails, so the line also goes
straight to the terminal (``/dev/tty``) when the install runs in one: that is where a user sees it.
Output without a terminal (CI logs, ``pip ... | tee``) has it only with ``pip install -v``; there
``python -m xtk info`` and the warning at the first eager fallback (xtk/backends.py) still say it.
"""
import re
import sys

from csrc.build import setuptools_missing, status_line

try:
    from setuptools import build_meta as _meta
    from setuptools.build_meta import *  # noqa: F401,F403  (the hooks not redefined below)
except Exception as e:  # noqa: BLE001 - not installed or broken; SystemExit: pip shows the message
    sys.exit(setuptools_missing(e))


def _too_old_setuptools():
    """What is missing for a wheel or editable build with the installed setuptools, or None."""
    import importlib.util
    import setuptools
    version = tuple(int(p) for p in re.findall(r"\d+", setuptools.__version__)[:2])
    if version < (64, 0):  # PEP 660 (pip install -e) arrived in setuptools 64
        return f"setuptools {setuptools.__version__} is too old (needs 64 or newer)"
    if version < (70, 1) and importlib.util.find_spec("wheel") is None:  # bdist_wheel moved into setuptools 70.1
        return f"setuptools {setuptools.__version__} needs the `wheel` package, which is not installed"
    return None


_missing = _too_old_setuptools()
if _missing:  # the Python 3.10/3.11 virtualenvs' own setuptools 65 without wheel, with --no-build-isolation
    sys.exit(f"xtk: cannot build: {_missing}: run `python -m pip install -U setuptools` first "
             "(installing torch 2.13 does that too)")


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    return _reporting(_meta.build_wheel, wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    return _reporting(_meta.build_editable, wheel_directory, config_settings, metadata_directory)


def _reporting(hook, *args):
    result = hook(*args)
    line = status_line()
    if line:
        _say(line)
    return result


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
    if sys.stderr.isatty():
        return
    try:  # pip captures stderr: write to the terminal the user runs pip in, if any
        with open("/dev/tty", "w") as tty:
            tty.write(f"\n{line}\n")
    except OSError:
        pass  # no terminal: the copy on stderr is in `pip install -v`'s output
