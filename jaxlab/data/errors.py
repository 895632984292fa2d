"""Errors raised for bad training data; messages always say where ("path:line: ...")."""


class DataError(ValueError):
  """Bad input data; the message names the file and 1-based line when known."""


def where(source) -> str:
  """Formats a (path, lineno) source as "path:lineno", or "<conversation>" when unknown."""
  if source is None:
    return "<conversation>"
  path, lineno = source
  return f"{path}:{lineno}"
