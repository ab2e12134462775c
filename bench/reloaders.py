"""The reload scenario of bench/reload.py, and how each proxy goes through it.

``RELOADS`` lists the ten config versions, each a change to the one before. For each
proxy a renderer writes a version in that proxy's own config language, and a
*reloader* starts the proxy with ``BASE``, applies a version the way an operator of
that proxy would, and stops every process it started:

- poise: the file is rewritten and the process started by ``poise run`` gets SIGHUP;
- HAProxy: ``haproxy -c -f NEW.cfg``, then (if valid) a new ``haproxy -f NEW.cfg -db
  -sf OLDPID``; the old process finishes its connections and exits. The optional
  *seamless* variant adds ``expose-fd listeners`` to a stats socket and ``-x SOCKET``
  (the new process takes over the old one's listening sockets) and ``option
  idle-close-on-response`` (idle keep-alive connections stay open through the soft
  stop, and are closed after answering one more request);
- nginx: the file is rewritten and ``nginx -s reload`` signals the master.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from string import Template

import configs
import procs

# ---------------------------------------------------------------- the scenario


@dataclass(frozen=True)
class Version:
    """One config of the scenario: backends as (name, weight), the balancing policy,
    whether the second listener exists, and whether the file is broken on purpose."""

    change: str
    backends: tuple[tuple[str, int], ...]
    policy: str = "round_robin"
    extra_listener: bool = False
    invalid: bool = False


BASE = Version("base config", (("b1", 1), ("b2", 1)))
BACKENDS = ("b1", "b2", "b3")


def _scenario() -> list[Version]:
    """The ten reloads, in order; each version is the previous one with one change."""
    v1 = replace(BASE, change="add backend b3", backends=(("b1", 1), ("b2", 1), ("b3", 1)))
    v2 = replace(v1, change="remove backend b1", backends=(("b2", 1), ("b3", 1)))
    v3 = replace(v2, change="policy: round robin → least connections", policy="least_conn")
    v4 = replace(v3, change="add a second listener", extra_listener=True)
    v5 = replace(v4, change="remove the second listener", extra_listener=False)
    v6 = replace(v5, change="invalid file (syntax error): must be rejected", invalid=True)
    v7 = replace(v5, change="weight of b3: 1 → 2", backends=(("b2", 1), ("b3", 2)))
    v8 = replace(v7, change="add backend b1 back", backends=(("b1", 1), ("b2", 1), ("b3", 2)))
    v9 = replace(v8, change="policy: back to round robin", policy="round_robin")
    v10 = replace(BASE, change="back to the base config")
    return [v1, v2, v3, v4, v5, v6, v7, v8, v9, v10]


RELOADS = _scenario()


@dataclass(frozen=True)
class Ports:
    """The proxy's main listener, the port of its second listener, and the backends."""

    main: int
    extra: int
    backends: dict[str, int]


# ---------------------------------------------------------------- rendering


def _fill(template: str, **values: object) -> str:
    """bench/templates/<template> with its $placeholders filled."""
    return Template((configs.TEMPLATES / template).read_text()).substitute(values)


def write_atomically(path: Path, text: str) -> None:
    """Replace path's content at once, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    os.replace(tmp, path)


def poise_text(v: Version, ports: Ports, workers: int) -> str:
    """poise YAML; the invalid version ends in an unclosed flow sequence."""
    servers = "\n".join(f"      - address: 127.0.0.1:{ports.backends[name]}"
                        + (f"\n        weight: {weight}" if weight != 1 else "")
                        for name, weight in v.backends)
    extra = (f"  - name: extra\n    bind: 127.0.0.1:{ports.extra}\n    protocol: http\n"
             f"    routes:\n      - cluster: app" if v.extra_listener else "")
    text = _fill("reload-poise.yaml", workers=workers, port=ports.main, extra_listener=extra,
                 policy=v.policy, servers=servers)
    return text + "listeners: [\n" if v.invalid else text


HAPROXY_BALANCE = {"round_robin": "roundrobin", "least_conn": "leastconn"}


def haproxy_text(v: Version, ports: Ports, seamless_socket: Path | None) -> str:
    """HAProxy config; the invalid version ends in a line with an unmatched quote.

    With ``seamless_socket`` (the optional variant, not HAProxy's default) the config
    exposes the listening sockets on that stats socket for ``-x``, and keeps idle
    keep-alive connections open through a soft stop (``idle-close-on-response``)."""
    servers = "\n".join(f"    server {name} 127.0.0.1:{ports.backends[name]}"
                        + (f" weight {weight}" if weight != 1 else "")
                        for name, weight in v.backends)
    extra = (f"\nfrontend extra\n    bind 127.0.0.1:{ports.extra}\n    default_backend app\n"
             if v.extra_listener else "")
    global_extra = defaults_extra = ""
    if seamless_socket:
        global_extra = (f"    stats socket {seamless_socket} mode 600 level admin "
                        f"expose-fd listeners\n")
        defaults_extra = "    option idle-close-on-response\n"
    text = _fill("reload-haproxy.cfg", global_extra=global_extra, defaults_extra=defaults_extra,
                 port=ports.main, extra_frontend=extra, balance=HAPROXY_BALANCE[v.policy],
                 servers=servers)
    return text + '    balance "roundrobin\n' if v.invalid else text


def nginx_text(v: Version, ports: Ports, prefix: Path) -> str:
    """nginx config; the invalid version lacks the closing brace of the http block."""
    policy = "        least_conn;\n" if v.policy == "least_conn" else ""
    servers = "\n".join(f"        server 127.0.0.1:{ports.backends[name]}"
                        + (f" weight={weight}" if weight != 1 else "") + ";"
                        for name, weight in v.backends)
    extra = f"        listen 127.0.0.1:{ports.extra};" if v.extra_listener else ""
    text = _fill("reload-nginx.conf", prefix=prefix, policy=policy, servers=servers,
                 port=ports.main, extra_listen=extra)
    return text.rstrip().removesuffix("}") + "\n" if v.invalid else text


# ---------------------------------------------------------------- reloaders


def _error_line(text: str) -> str:
    """The first ALERT/emerg line of a tool's output (else its last line), tidied."""
    lines = [" ".join(line.split()) for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "[ALERT]" in line or "[emerg]" in line]
    return (errors or lines or [""])[0 if errors else -1]


class Reloader:
    """A proxy under the scenario: start() on BASE, reload() each version, stop().

    ``reload`` returns at once with what the harness saw: ``{"outcome": "signalled" |
    "new process" | "rejected", "detail": str}``; whether the proxy then applies the
    version is for the probes and the load generator to tell."""

    method = ""

    def __init__(self, name: str, workdir: Path, ports: Ports):
        self.name = name
        self.dir = workdir
        self.ports = ports
        self.dir.mkdir(parents=True, exist_ok=True)

    def start(self, timeout: float) -> None:
        raise NotImplementedError

    def reload(self, step: int, version: Version) -> dict:
        raise NotImplementedError

    def alive(self) -> bool:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def notes(self) -> dict:
        """Facts worth keeping in the results (read after stop())."""
        return {}


class PoiseReloader(Reloader):
    """``poise run CONFIG``; a reload rewrites CONFIG and sends SIGHUP to that process."""

    def __init__(self, name: str, workdir: Path, ports: Ports, cmd: str, workers: int):
        super().__init__(name, workdir, ports)
        self.workers = workers
        self.method = f"`workers: {workers}`; file rewritten, `kill -HUP` to `poise run`"
        self.conf = self.dir / "poise.yaml"
        self.svc = procs.Service(name, shlex.split(cmd) + [str(self.conf)],
                                 self.dir / "poise.log")

    def start(self, timeout: float) -> None:
        """Write the base config, start poise and wait until it answers."""
        write_atomically(self.conf, poise_text(BASE, self.ports, self.workers))
        self.svc.start()
        self.svc.wait_ready([self.ports.main], timeout)

    def reload(self, step: int, version: Version) -> dict:
        """Rewrite the file, then SIGHUP the process `poise run` started as."""
        write_atomically(self.conf, poise_text(version, self.ports, self.workers))
        os.kill(self.svc.pid, signal.SIGHUP)
        return {"outcome": "signalled", "detail": f"SIGHUP to {self.svc.pid}"}

    def alive(self) -> bool:
        return self.svc.alive()

    def stop(self) -> None:
        self.svc.stop()

    def notes(self) -> dict:
        """What poise's log says about the SIGHUPs: 'SIGHUP ignored' (no reload yet), or
        lines about reloads, counting those that say a reload was rejected."""
        try:
            lines = self.svc.log_path.read_text(errors="replace").splitlines()
        except OSError:
            lines = []
        ignored = sum("SIGHUP ignored" in line for line in lines)
        reload_lines = [line for line in lines
                        if "reload" in line.lower() and "SIGHUP ignored" not in line]
        rejected = sum("reject" in line.lower() for line in reload_lines)
        return {"sighup_ignored": ignored, "rejected_in_log": rejected,
                "reload_log_lines": reload_lines[-30:]}


class HAProxyReloader(Reloader):
    """HAProxy, one process per config generation, each replacing the last with -sf."""

    def __init__(self, name: str, workdir: Path, ports: Ports, seamless: bool):
        super().__init__(name, workdir, ports)
        self.seamless = seamless
        self.socket = self.dir / "haproxy.sock" if seamless else None
        self.method = ("`haproxy -c`, then a new process with `-sf OLDPID`"
                       + (" `-x SOCKET`; not the default config: `stats socket ... expose-fd "
                          "listeners` and `option idle-close-on-response` added" if seamless
                          else "; default config (no socket transfer, idle connections "
                               "closed at soft stop)"))
        self.generations: list[procs.Service] = []
        self.exited_before_stop: int | None = None   # old generations gone by themselves

    def _config(self, step: int, version: Version) -> Path:
        path = self.dir / f"haproxy-v{step}.cfg"
        path.write_text(haproxy_text(version, self.ports, self.socket))
        return path

    def _spawn(self, conf: Path, extra: list[str]) -> procs.Service:
        """Start one more haproxy process (its own session and log)."""
        n = len(self.generations)
        svc = procs.Service(f"{self.name}-g{n}", ["haproxy", "-f", str(conf), "-db", *extra],
                            self.dir / f"haproxy-g{n}.log")
        self.generations.append(svc)
        svc.start()
        return svc

    def current(self) -> procs.Service | None:
        """The newest haproxy process still running (the one serving new connections)."""
        return next((g for g in reversed(self.generations) if g.alive()), None)

    def start(self, timeout: float) -> None:
        """Start the first generation on the base config and wait until it answers."""
        self._spawn(self._config(0, BASE), []).wait_ready([self.ports.main], timeout)

    def reload(self, step: int, version: Version) -> dict:
        """Check the new file as an operator would; if valid, start the next generation."""
        conf = self._config(step, version)
        check = subprocess.run(["haproxy", "-c", "-f", str(conf)], capture_output=True,
                               text=True, timeout=30)
        if check.returncode != 0:
            return {"outcome": "rejected",
                    "detail": f"haproxy -c: {_error_line(check.stdout + check.stderr)}"}
        old = self.current()
        extra = ["-sf", str(old.pid)] if old else []
        if old and self.socket:
            extra += ["-x", str(self.socket)]
        new = self._spawn(conf, extra)
        return {"outcome": "new process", "detail": f"pid {new.pid} {' '.join(extra)}"}

    def alive(self) -> bool:
        return self.current() is not None

    def stop(self) -> None:
        """Stop every generation, including old ones still finishing connections."""
        if self.exited_before_stop is None:
            self.exited_before_stop = sum(not g.alive() for g in self.generations)
        for svc in self.generations:
            svc.stop()

    def notes(self) -> dict:
        return {"haproxy_processes": len(self.generations),
                "exited_before_stop": self.exited_before_stop}


class NginxReloader(Reloader):
    """One nginx master; a reload rewrites its file and runs ``nginx -s reload``."""

    method = "file rewritten, `nginx -s reload` (master starts new workers, old ones drain)"

    def __init__(self, name: str, workdir: Path, ports: Ports):
        super().__init__(name, workdir, ports)
        self.prefix = configs.nginx_prefix(self.dir, "nginx")
        self.conf = self.prefix / "nginx.conf"
        self.svc = procs.Service(name, configs.nginx_command(self.prefix, self.conf),
                                 self.dir / "nginx.log")

    def start(self, timeout: float) -> None:
        """Write the base config, start the master and wait until it answers."""
        write_atomically(self.conf, nginx_text(BASE, self.ports, self.prefix))
        self.svc.start()
        self.svc.wait_ready([self.ports.main], timeout)

    def reload(self, step: int, version: Version) -> dict:
        """Rewrite the file and signal the master; nginx refuses an invalid file."""
        write_atomically(self.conf, nginx_text(version, self.ports, self.prefix))
        proc = subprocess.run(configs.nginx_command(self.prefix, self.conf, "-s", "reload"),
                              capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            return {"outcome": "rejected",
                    "detail": f"nginx -s reload: {_error_line(proc.stdout + proc.stderr)}"}
        return {"outcome": "signalled", "detail": "nginx -s reload"}

    def alive(self) -> bool:
        return self.svc.alive()

    def stop(self) -> None:
        self.svc.stop()
