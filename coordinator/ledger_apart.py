"""A ledger migrated in a child process, so that the serving coordinator never imports Alembic.

Once imported, Alembic, Mako, Pygments and the migration scripts stay in a process's memory for
as long as it runs: about 14 MiB of a fresh coordinator's 123 MiB at idle (a restarted one, whose
ledger is at the head already, idles at 109 MiB). `coordinator serve` therefore brings a ledger
at an older revision (an upgrade) to the newest with `python -m coordinator.ledger_apart`, which
exits once done. A ledger at the head is recognised without it (`Ledger.at_head`), as on every
restart, and a new, empty database gets its schema from the models in the parent, without
Alembic either (`Ledger.create_if_empty`). The database URL goes to the child on its standard
input (never on its command line, where `ps` would show a password).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import sys

from sqlalchemy.exc import SQLAlchemyError

from coordinator.ledger import Ledger
from coordinator.startup import StartupError, database_error, masked_url

__all__ = ["MigrationChild", "migrate_apart"]


async def migrate_apart(ledger: Ledger) -> bool:
    """Brings `ledger` to the newest revision in a child process, if it is not there already.

    Returns whether the child ran.

    Raises:
        StartupError: The child could not migrate (its one-line reason).
        SQLAlchemyError: The database cannot be reached to read its revision.
    """
    child = await MigrationChild.start(ledger)
    if child is None:
        return False
    await child.finish()
    return True


class MigrationChild:
    """A ledger migration running in a child process, so its parent can go on meanwhile.

    `coordinator serve` starts it before it imports the run engine and the servicer (a second of
    CPU), so the two run side by side on a first start instead of one after the other.
    """

    def __init__(self, ledger: Ledger, process: asyncio.subprocess.Process) -> None:
        self.ledger = ledger
        self.process = process

    @classmethod
    async def start(cls, ledger: Ledger) -> MigrationChild | None:
        """The started child, or None when the ledger is at the newest revision already, or
        was empty and got the schema here, from the models (`Ledger.create_if_empty`: no
        Alembic, no migration chain, no child).

        Raises:
            SQLAlchemyError: The database cannot be reached to read its revision.
            StartupError: The child exited before it read the database URL (one line: why).
        """
        if await asyncio.to_thread(ledger.current_without_alembic):
            return None
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "coordinator.ledger_apart",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        assert process.stdin is not None
        child = cls(ledger, process)
        try:
            # The URL goes on standard input, never on the command line (where `ps` shows it).
            process.stdin.write(ledger.url.encode())
            await process.stdin.drain()
            process.stdin.close()
        except (BrokenPipeError, ConnectionResetError) as exc:  # the child died at once
            raise await child._died_at_once() from exc
        except BaseException:
            await child.abandon()
            raise
        return child

    async def _died_at_once(self) -> StartupError:
        """Why the child exited before it read the URL: its last line of output, in one line."""
        await self.abandon()  # it closed its input: it has exited, or is about to
        assert self.process.stderr is not None
        lines = (await self.process.stderr.read()).decode(errors="replace").strip().splitlines()
        reason = " ".join(lines[-1].split()) if lines else "no output"
        return StartupError(
            f"the ledger migration process ({sys.executable} -m coordinator.ledger_apart) exited "
            f"with code {self.process.returncode} before it read the database URL: {reason}"
        )

    async def finish(self) -> None:
        """Waits for the child.

        Raises:
            StartupError: The child could not migrate (its one-line reason).
        """
        _, err = await self.process.communicate()
        if self.process.returncode != 0:
            lines = err.decode(errors="replace").strip().splitlines()
            raise StartupError(
                lines[-1]
                if lines
                else f"the ledger migration exited with code {self.process.returncode}"
            )
        # What this process's pool opened before the schema changed is not used again.
        await asyncio.to_thread(self.ledger.engine.dispose)

    async def abandon(self) -> None:
        """Stops the child when its parent gives up starting (another check refused it).

        A migration is one transaction: stopped half way, it leaves the ledger as it was.
        """
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()


def _migrate(url: str) -> str | None:
    """Migrates the ledger at `url`; None, or the one-line reason it could not be migrated."""
    ledger = Ledger(url)
    try:
        ledger.migrate()
    except SQLAlchemyError as exc:
        return str(database_error(url, exc))
    except Exception as exc:  # Alembic's own (an unknown revision, a broken script)
        detail = " ".join(str(exc).split()) or type(exc).__name__
        return f"cannot migrate the ledger database {masked_url(url)}: {detail}"
    finally:
        ledger.close()
    return None


def main() -> None:
    # A process that migrates and exits: the cyclic collector's passes over Alembic's and the
    # scripts' imports would find nothing (~7% of the child's CPU, which a first start waits for).
    gc.disable()
    problem = _migrate(sys.stdin.read().strip())
    if problem is not None:
        print(problem, file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
