"""Database logic shared by the API, the worker and the CLI.

Routes and tasks stay thin: they call one function here. Mutating functions commit themselves,
because several of them must act *after* the commit (publishing a job id, for one), and every
state change is a conditional UPDATE so two processes racing on one row cannot both win.
Because they commit (or roll back) the session's transaction, call them with no pending changes
of your own in that session.
"""
