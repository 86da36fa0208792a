"""twisted.cred's parts for a user the handshake has authenticated: the credentials (the
verifier machine's key confirmation), a checker, and the realm that gives the user their avatar,
a storage.Root (their root directory and their rights), in the role Conch's ISFTPServer avatar
plays for SFTP.

The password itself is never a cred credential: SPAKE2+ checks it inside the handshake, which a
checker cannot drive (it needs several messages each way). What reaches the portal is the fact
that a user's key confirmation succeeded; the checker accepts that and nothing else. A deployment
that wants another view of the disk (a quota, a virtual tree) supplies another realm.
"""

from twisted.cred import portal
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ICredentials
from twisted.internet import defer
from zope.interface import implementer

from . import quotas, storage
from .storage import IStorage


class IKeyConfirmed(ICredentials):
    """A user whose SPAKE2+ key confirmation the server has checked (verifier.Confirmed)."""


@implementer(IKeyConfirmed)
class KeyConfirmed:
    def __init__(self, user):
        self.user = user  # the userdb.User record the handshake was run against


@implementer(ICredentialsChecker)
class KeyConfirmationChecker:
    credentialInterfaces = (IKeyConfirmed,)

    def requestAvatarId(self, credentials):
        # The avatar id is the user's record as the handshake saw it, not a name to look up
        # again: a reload of the users file meanwhile cannot change whose rights are given.
        return defer.succeed(credentials.user)


@implementer(portal.IRealm)
class UsersRealm:
    """A user's storage.Root: their own root, or the server's, with their rights and quotas.
    `accounts`: the server's quotas.Accounts (None: no quotas at all)."""

    def __init__(self, default_root, protected, max_upload_size, accounts=None):
        self.default_root = default_root
        self.protected = protected
        self.max_upload_size = max_upload_size
        self.accounts = accounts

    def requestAvatar(self, user, mind, *interfaces):
        if IStorage not in interfaces:
            raise NotImplementedError("this realm only gives IStorage avatars")
        path = user.root or self.default_root
        quota = None
        if self.accounts is not None:
            if user.has_quota:
                self.accounts.track(path)  # counted already, or from now on
            # Also without limits of their own: their changes count for those sharing the root.
            quota = quotas.Quota(self.accounts, path, user.quota_bytes, user.quota_files)
        root = storage.Root(
            path, protected=self.protected, rights=user.rights, max_upload_size=self.max_upload_size, quota=quota,
        )
        return IStorage, root, lambda: None


def users_portal(default_root, protected, max_upload_size, accounts=None):
    return portal.Portal(UsersRealm(default_root, protected, max_upload_size, accounts), [KeyConfirmationChecker()])
