"""A context manager that records the XLA compilations jax logs inside a ``with`` block."""
import logging

import jax


class CompileLog(logging.Handler):
    """Collects jax's "Compiling <fun> ..." log lines (emitted under ``jax.log_compiles()``)."""

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        message = record.getMessage()
        if message.startswith(("Compiling ", "Finished XLA compilation")):
            self.messages.append(message)

    def count(self, fun_name: str) -> int:
        return sum(m.startswith(f"Compiling jit({fun_name})") for m in self.messages)

    def __enter__(self):
        self._logger = logging.getLogger("jax")
        self._old_level = self._logger.level
        self._logger.setLevel(logging.WARNING)
        self._logger.addHandler(self)
        self._log_compiles = jax.log_compiles(True)
        self._log_compiles.__enter__()
        return self

    def __exit__(self, *exc):
        self._log_compiles.__exit__(*exc)
        self._logger.removeHandler(self)
        self._logger.setLevel(self._old_level)


class NoCompilation(CompileLog):
    """Fails the test if XLA compiles anything inside the ``with`` block."""

    def __exit__(self, *exc):
        super().__exit__(*exc)
        assert not self.messages, f"compiled before rejecting the input: {self.messages}"
