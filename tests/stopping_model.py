"""A user model module whose one rank stops itself (SIGSTOP) mid-training, for hang tests.

    (tmp_path / "usermod.py").write_text(stopping_module(rank=1))
    ... "--model", "usermod:stops_at_step_4" ...

Stopping from inside, in the rank's fourth training forward, is what a SIGSTOP from outside
does, at a known step and without a race against the run's start.
"""

from __future__ import annotations

import textwrap

MODEL_SPEC = "usermod:stops_at_step_4"


def stopping_module(rank: int) -> str:
    """The source of `usermod.py`: a small GRU LM that stops rank `rank` at its 4th step."""
    return textwrap.dedent(f"""
        import os
        import signal

        from shardwise.models import RecurrentLM


        class StopsAtStep4(RecurrentLM):
            calls = 0

            def forward(self, tokens, lengths=None):
                if self.training:
                    self.calls += 1
                    if os.environ.get("RANK") == "{rank}" and self.calls == 4:
                        os.kill(os.getpid(), signal.SIGSTOP)
                return super().forward(tokens, lengths)


        def stops_at_step_4(vocab_size):
            return StopsAtStep4(vocab_size, embed_dim=16, hidden_dim=16, num_layers=1, cell="gru")
    """)
