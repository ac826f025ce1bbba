"""Forming (and re-forming) the GLOO group: rank 0's rendezvous store, the join handshake with
the cluster token, and group generations.

Rank 0 hosts a TCP key-value store for its whole life, bound to ``--master-addr`` only (not
every interface, as ``init_process_group``'s own store does); under torchrun it uses the agent's
store instead. A worker *joins* by answering the current challenge with
``HMAC(token, challenge | rank | nonce)``; rank 0 admits every rank at once, gives the group a
new *generation* number, and all of them create a GLOO group whose rendezvous keys live under a
prefix derived from the token and that challenge, so a process without the token can neither
join nor find the group's keys. When a group breaks (a worker died), rank 0 serves alone and
watches the store: once every worker has asked to join again — the survivors do so by
themselves, a restarted board by running its usual command — it forms the next generation.

What the token does not do: the store and GLOO traffic are plain TCP, neither encrypted nor
integrity-protected; an on-path attacker can read activations and tamper with them. Run the
cluster on a private network (or a WireGuard/VPN link) when that matters.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import logging
import os
import secrets
import socket
import time

import torch
import torch.distributed as dist

from .group import ClusterError, GroupConfig, gloo_interface

log = logging.getLogger(__name__)

POLL_S = 0.05  # how often rank 0 looks for join requests while it waits for them
# Whether TCPStore can serve from a socket bound here (master_listen_fd). torch 2.5's cannot: it
# adopts the socket without its address and aborts the process the first time it logs it (seen
# as soon as a worker in another network namespace connects). Verified to work on torch 2.14;
# versions in between are untested, so they get the unbound store.
ADOPTS_BOUND_SOCKET = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 14)


def _proof(token: str | None, *parts: object) -> str:
    message = "|".join(str(part) for part in parts).encode()
    return hmac.new((token or "").encode(), message, hashlib.sha256).hexdigest()


def agent_hosts_store(config: GroupConfig) -> bool:
    """Whether torchrun's agent already hosts the store on the master port (every rank is then a
    client of it, rank 0 included: the port is in use by design)."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and \
        os.environ.get("MASTER_PORT") == str(config.master_port)


class Rendezvous:
    """This rank's view of the store and of the current group generation.

    Rank 0: :meth:`form` admits every worker and creates the group; :meth:`all_waiting` says
    whether every worker has asked to (re)join. Workers: :meth:`join`. Both: :meth:`leave`
    (the group only) and :meth:`close` (also the store).
    """

    def __init__(self, config: GroupConfig):
        self.config = config
        self.generation = -1
        self._refused: dict[int, str] = {}  # rank -> why its last join request was refused
        self._timeout = datetime.timedelta(seconds=config.timeout_s)
        interface = gloo_interface(config)
        if interface:  # GLOO's own listening sockets go where the group's traffic goes, not everywhere
            os.environ["GLOO_SOCKET_IFNAME"] = interface
        if dist.is_initialized():
            raise ClusterError("a process group is already initialised in this process")
        self.store = self._open_store()
        if config.rank == 0:
            self._new_challenge()

    # ------------------------------------------------------------------ the store

    def _open_store(self) -> dist.Store:
        config = self.config
        where = f"{config.master_addr}:{config.master_port}"
        try:
            if agent_hosts_store(config):  # torchrun's agent hosts the store; every rank is a client of it
                store = dist.TCPStore(config.master_addr, config.master_port, None, False, self._timeout)
                attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
                return dist.PrefixStore(f"prism-trt/attempt_{attempt}/", store)
            if config.rank != 0:
                return dist.PrefixStore("prism-trt/", dist.TCPStore(config.master_addr, config.master_port, None,
                                                                     False, self._timeout))
            if not ADOPTS_BOUND_SOCKET:
                log.warning("torch %s cannot serve the rendezvous from a socket bound to %s (its TCPStore crashes "
                            "formatting an adopted socket's address); the store listens on every interface. "
                            "Joining still needs the cluster token", torch.__version__, config.master_addr)
                store = dist.TCPStore(config.master_addr, config.master_port, None, True, self._timeout,
                                      wait_for_workers=False)
                return dist.PrefixStore("prism-trt/", store)
            # Bind the listening socket ourselves: TCPStore binds every interface when it binds itself.
            # (the legacy backend: libuv's cannot take a socket). The store owns and closes the socket.
            family = socket.AF_INET6 if ":" in config.master_addr else socket.AF_INET
            with socket.create_server((config.master_addr, config.master_port), family=family, backlog=128) as sock:
                store = dist.TCPStore(config.master_addr, config.master_port, None, True, self._timeout,
                                      wait_for_workers=False, master_listen_fd=sock.fileno(), use_libuv=False)
                sock.detach()
            return dist.PrefixStore("prism-trt/", store)
        except (RuntimeError, OSError, ValueError) as error:
            hosting = config.rank == 0 and not agent_hosts_store(config)
            role = "host the rendezvous" if hosting else "reach rank 0's rendezvous"
            raise ClusterError(f"rank {config.rank}/{config.world_size} could not {role} at {where} within "
                               f"{config.timeout_s:g} s: {error}") from error

    def _new_challenge(self) -> None:
        self.challenge = secrets.token_hex(16)
        self.store.set("challenge", self.challenge)

    def _group_store(self, challenge: str) -> dist.Store:
        # A prefix no one without the token can compute: the group's keys cannot be found or disturbed.
        secret = _proof(self.config.token, "group", challenge)[:32]
        return dist.PrefixStore(f"g{self.generation}/{secret}/", self.store)

    def _init_group(self, challenge: str) -> None:
        config = self.config
        try:
            dist.init_process_group("gloo", store=self._group_store(challenge), rank=config.rank,
                                    world_size=config.world_size, timeout=self._timeout)
        except (RuntimeError, ValueError, OSError) as error:
            raise ClusterError(f"rank {config.rank}/{config.world_size} could not form group generation "
                               f"{self.generation} within {config.timeout_s:g} s: {error}") from error

    # ------------------------------------------------------------------ rank 0

    def _join_request(self, rank: int) -> dict | None:
        """The request waiting from ``rank``, if a valid one is there; a bad one is answered and dropped."""
        key = f"join/{rank}"
        if not self.store.check([key]):
            return None
        raw = self.store.get(key)
        try:
            request = json.loads(raw)
            nonce, challenge, proof = str(request["nonce"]), str(request["challenge"]), str(request["proof"])
        except (ValueError, KeyError, TypeError):
            self.store.delete_key(key)
            self._refused[rank] = "sent a malformed join request"
            return None
        if challenge != self.challenge:  # asked before the last generation formed: it will ask again
            self._answer(rank, nonce, {"retry": "the challenge changed"})
            return None
        # bytes, not str: compare_digest raises on non-ASCII text, which anyone reaching the store could send
        if not hmac.compare_digest(proof.encode(), _proof(self.config.token, challenge, rank, nonce).encode()):
            self._refused[rank] = "presented a wrong cluster token"
            log.warning("rank %d asked to join with a wrong cluster token; refused", rank)
            self._answer(rank, nonce, {"error": "rank 0 refused this rank: its cluster token does not match "
                                                "rank 0's (--cluster-token / PRISM_TRT_CLUSTER_TOKEN)"})
            return None
        return {"nonce": nonce}

    def _answer(self, rank: int, nonce: str, answer: dict) -> None:
        self.store.delete_key(f"join/{rank}")
        self.store.set(f"admit/{rank}/{nonce}", json.dumps(answer))

    def all_waiting(self) -> bool:
        """Whether every worker has a valid join request waiting (cheap: one store check per worker)."""
        return all(self._join_request(rank) is not None for rank in range(1, self.config.world_size))

    def form(self, timeout_s: float | None = None) -> int:
        """Rank 0: wait until every worker asks to join (at most ``timeout_s``, default the group's
        timeout), admit them, and create the next generation's group. Returns the generation.
        A refused request (a wrong token) does not end the wait: whoever reaches the port could
        otherwise stop a cluster from starting; the right worker may still come. The timeout's
        error names the refusals."""
        deadline = time.monotonic() + (self.config.timeout_s if timeout_s is None else timeout_s)
        workers = range(1, self.config.world_size)
        requests: dict[int, dict] = {}
        while True:
            for rank in workers:
                if rank not in requests and (request := self._join_request(rank)) is not None:
                    requests[rank] = request
            if len(requests) == len(workers):
                break
            if time.monotonic() > deadline:
                missing = [rank for rank in workers if rank not in requests]
                reasons = "; ".join(f"rank {rank} {self._refused[rank]}" for rank in missing if rank in self._refused)
                waited = self.config.timeout_s if timeout_s is None else timeout_s
                raise ClusterError(f"rank(s) {missing} did not join the group at {self.config.master_addr}:"
                                   f"{self.config.master_port} within {waited:g} s"
                                   + (f" ({reasons})" if reasons else " (not started, or started with another "
                                                                      "--master-addr/--master-port?)"))
            time.sleep(POLL_S)
        self.generation += 1
        challenge = self.challenge
        for rank, request in requests.items():
            self._answer(rank, request["nonce"], {"generation": self.generation})
        self._new_challenge()  # a recorded answer cannot be replayed for the next generation
        self._refused.clear()
        self._init_group(challenge)
        return self.generation

    # ------------------------------------------------------------------ workers

    def join(self) -> int | None:
        """A worker: ask rank 0 to be admitted and create the group it forms; returns the
        generation, or None when rank 0 stopped meanwhile. Waits as long as rank 0 is reachable
        (it may be waiting for another board to come back); a refusal, or a rank 0 that went
        away, is a ClusterError."""
        rank = self.config.rank
        while True:
            nonce = secrets.token_hex(16)
            answer_key = f"admit/{rank}/{nonce}"
            try:
                if self.store.check(["stopped"]):
                    return None
                challenge = self.store.get("challenge").decode()
                self.store.set(f"join/{rank}", json.dumps({"nonce": nonce, "challenge": challenge,
                                                           "proof": _proof(self.config.token, challenge, rank, nonce)}))
                try:
                    self.store.wait([answer_key])
                except RuntimeError:
                    self.store.check(["stopped"])  # raises too when the store itself is gone
                    continue  # rank 0 is alive but still waiting for another rank: ask again
                answer = json.loads(self.store.get(answer_key))
                self.store.delete_key(answer_key)
            except RuntimeError as error:  # the store connection broke: rank 0 is gone
                raise ClusterError(f"rank {rank}: lost rank 0's rendezvous at {self.config.master_addr}:"
                                   f"{self.config.master_port}: {error}") from error
            if "error" in answer:
                raise ClusterError(f"rank {rank}: {answer['error']}")
            if answer.get("stopped"):
                return None
            if "generation" in answer:
                self.generation = int(answer["generation"])
                self._init_group(challenge)
                return self.generation

    # ------------------------------------------------------------------ both

    def leave(self) -> None:
        """Leave the current group (not the store): the next :meth:`form`/:meth:`join` makes a new one."""
        if dist.is_initialized():
            dist.destroy_process_group()

    def close(self) -> None:
        """Leave the group and the store; rank 0 first answers workers waiting to join that it stopped."""
        self.leave()
        if self.config.rank == 0 and self.store is not None:
            try:
                self.store.set("stopped", "1")
                for rank in range(1, self.config.world_size):
                    if self.store.check([f"join/{rank}"]):
                        nonce = json.loads(self.store.get(f"join/{rank}")).get("nonce", "")
                        self._answer(rank, str(nonce), {"stopped": True})
            except (RuntimeError, ValueError, AttributeError):
                pass  # best effort: a waiting worker also notices the store going away
        self.store = None  # the last reference: the store's server (rank 0) closes its socket
