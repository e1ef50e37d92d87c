"""The workspace: a catalog database and an artifact store, found in one folder.

``Workspace.open()`` finds it (``--workspace``, else ``$GENLOOP_HOME``, else
``./genloop-workspace``); ``init_workspace()`` creates or migrates it.
"""

from genloop.workspace.workspace import Workspace, init_workspace, resolve_root

__all__ = ["Workspace", "init_workspace", "resolve_root"]
