"""Continuous ping for the integration tests: every echo counted by sequence number."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

from tests.support.lab import wait_for


class Pinger:
    """`ping -i 0.01` running in a namespace, its replies counted by sequence number."""

    def __init__(self, netns: str, target: IPv4Address | str, log_path: Path):
        self.target = str(target)
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.process = subprocess.Popen(["ip", "netns", "exec", netns, "ping", "-n", "-i", "0.01", "-W", "1",
                                         self.target], stdin=subprocess.DEVNULL, stdout=self._log,
                                        stderr=subprocess.STDOUT)
        self.started = time.monotonic()
        self.result: PingResult | None = None

    def replies(self) -> int:
        self._log.flush()
        return self.log_path.read_text().count("bytes from")

    def wait_replies(self, more: int, timeout: float = 60.0) -> None:
        """Poll until `more` further replies have come in: traffic really flowed over a period."""
        target = self.replies() + more
        wait_for(lambda: self.replies() >= target, f"{more} more replies from {self.target}", timeout)

    def stop(self) -> "PingResult":
        if self.result is None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGINT)
            self.process.wait(timeout=30)
            self._log.close()
            self.result = PingResult.parse(self.log_path.read_text(), time.monotonic() - self.started)
        return self.result


@dataclass(frozen=True)
class PingResult:
    sent: int
    answered: int
    lost: list[int]        # sequence numbers sent and never answered (the last one excepted)
    duplicates: int
    seconds: float

    @classmethod
    def parse(cls, output: str, seconds: float) -> "PingResult":
        match = re.search(r"(\d+) packets transmitted", output)
        assert match, f"ping printed no summary:\n{output[-2000:]}"
        sent = int(match.group(1))
        replies = [int(seq) for seq in re.findall(r"bytes from .* icmp_seq=(\d+)", output)]
        answered = set(replies)
        # icmp_seq starts at 1; the last one sent may still have been on its way when stopped.
        lost = [seq for seq in range(1, sent) if seq not in answered]
        return cls(sent, len(answered), lost, len(replies) - len(answered), seconds)

    def describe(self) -> str:
        return (f"{self.sent} sent over {self.seconds:.1f} s, {len(self.lost)} lost"
                f"{f' (seq {self.lost[:10]})' if self.lost else ''}, {self.duplicates} duplicates")
