"""Shared by the launch scripts (stdlib only; run as `python launch/<script>.py`, so this directory is on
sys.path)."""


def split_main_args(argv: list[str]) -> tuple[list[str], list[str]]:
  """argv -> (the launcher's own arguments, the arguments after `--` for `python -m vlm_jax.main`)."""
  if "--" in argv:
    i = argv.index("--")
    return argv[:i], argv[i + 1:]
  return argv, []
