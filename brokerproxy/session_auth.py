"""Who the client is and what it may do, in the session: AUTH and HELLO (the client authenticates to the proxy,
never to Redis: its credentials are checked here and never forwarded; HELLO also switches the RESP version and may
name the connection), ACL (WHOAMI, CAT and LOG are the proxy's own), and the record of each refusal by the ACL.

``Auth`` is a mixin of ``Session``: its handlers are entries of the session's handler table, and the state
they read and set is the session's, initialised in ``Session.__init__``; the annotations below declare it for the
type checker only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import acl_log, resp
from .acl_log import AclLog
from .observe import Observer
from .session_events import Authenticator, AuthFailed, Denied, Event, Policy
from .session_replies import AUTH_NO_PASSWORD, NOAUTH_HELLO, NOPROTO, NOT_IN_MULTI, WRONGPASS, wrong_args


class Auth:
    # The session's state these handlers read and set, initialised in Session.__init__.
    user: str | None
    protocol: int
    client_info: str
    _auth: Authenticator
    _policy: Policy | None
    _observer: Observer | None
    _auth_command: bytes
    _acl_log: AclLog | None
    _events: list[Event]
    _in_multi: bool
    _client_name: bytes | None

    if TYPE_CHECKING:  # Session's, in session.py

        def _forward(self, req: resp.Request, raw: bytes | None = None, expected: int = 1, hook: str = "") -> None: ...

        def _local(self, data: bytes, force: bool = False) -> None: ...

        def _refuse(self, text: str) -> None: ...

        def _open_upstream(self) -> None: ...

    def _authenticated(self, user: str) -> None:
        first = self.user is None
        self.user = user
        if first:
            self._open_upstream()

    def _cmd_auth(self, req: resp.Request) -> None:
        args = req.args
        self._auth_command = args[0]
        if self._in_multi:
            self._refuse(NOT_IN_MULTI)
            return
        if len(args) == 2:
            if not self._auth.required:
                self._local(resp.error(AUTH_NO_PASSWORD))
                return
            username, password = b"default", args[1]
        elif len(args) == 3:
            username, password = args[1], args[2]
        else:
            self._local(resp.error(wrong_args("auth")))
            return
        user = self._check_password(username, password)
        if user is None:
            self._local(resp.error(WRONGPASS))
            return
        self._local(resp.OK)
        self._authenticated(user)

    def _check_password(self, username: bytes, password: bytes) -> str | None:
        if not self._auth.required and username == b"default":
            user: str | None = "default"  # Redis's default user with nopass: any password
        else:
            user = self._auth.check(username, password)  # another user authenticates as usual, as in Redis
        if user is None:
            self._events.append(AuthFailed(username.decode("utf-8", "replace")))
            if self._acl_log is not None:
                self._acl_log.record_auth_failure(username, self._auth_command, client_info=self.client_info)
        return user

    def _cmd_hello(self, req: resp.Request) -> None:
        args = req.args
        self._auth_command = args[0]
        if self._in_multi:
            self._refuse(NOT_IN_MULTI)
            return
        version = None
        if len(args) >= 2:
            try:
                version = int(args[1])
            except ValueError:
                self._local(resp.error("ERR Protocol version is not an integer or out of range"))
                return
            if version not in (2, 3):
                self._local(resp.error(NOPROTO))
                return
        forwarded = [b"HELLO"] + ([args[1]] if version is not None else [])
        credentials = None
        i = 2
        while i < len(args):
            opt = args[i].lower()
            if opt == b"auth" and i + 2 < len(args):
                credentials = (args[i + 1], args[i + 2])
                i += 3
            elif opt == b"setname" and i + 1 < len(args):
                forwarded += [b"SETNAME", args[i + 1]]
                self._client_name = args[i + 1]
                i += 2
            else:
                self._local(resp.error(f"ERR Syntax error in HELLO option '{args[i].decode('utf-8', 'replace')}'"))
                return
        if credentials is not None:
            user = self._check_password(*credentials)
            if user is None:
                self._local(resp.error(WRONGPASS))
                return
            self._authenticated(user)
        elif self.user is None:
            self._local(resp.error(NOAUTH_HELLO))
            return
        # The client's credentials are never forwarded: Redis sees HELLO <version> [SETNAME name].
        raw = req.raw if credentials is None else resp.encode_command(forwarded)
        previous = self.protocol
        if version is not None:
            self.protocol = version
        self._forward(req, raw, hook=f"hello:{previous}")

    def _cmd_acl(self, req: resp.Request) -> None:
        """ACL WHOAMI/CAT/LOG are the proxy's own (about its users, not Redis's). Any other subcommand reaches
        Redis only for a user the ACL explicitly allows it; without an ACL, never."""
        log = self._acl_log
        reply = acl_log.answer(req.args, self.user, log, self.protocol) if log is not None else None
        if reply is not None:
            self._local(reply)
        elif self._policy is not None and len(req.args) >= 2:
            self._forward(req)  # the policy already allowed this user acl|<subcommand>
        else:
            sub = req.args[1].decode("utf-8", "replace").lower() if len(req.args) >= 2 else ""
            self._refuse(f"NOPERM this user has no permissions to run the 'acl|{sub}' command")

    def _denied(self, req: resp.Request, text: str) -> None:
        """Record a refusal by the ACL: in ACL LOG, the metrics and the events (for the audit trail)."""
        explain = getattr(self._policy, "explain", None)
        denial = explain(self.user, req) if explain is not None else None
        kind = denial.reason if denial is not None else "other"
        if self._acl_log is not None and denial is not None and self.user is not None:
            context = "multi" if self._in_multi else "toplevel"
            self._acl_log.record_denial(denial, self.user, context=context, client_info=self.client_info)
        if self._observer is not None:
            self._observer.acl_denied(self.user, kind)
            self._observer.command(req.name, "denied")  # never reached Redis: neither ok nor error
        obj = denial.object.decode("utf-8", "backslashreplace") if denial is not None else ""
        self._events.append(Denied(self.user, req.name, kind, obj))
