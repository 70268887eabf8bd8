"""Journal backends behind one interface (`base.Store`): memory and SQLite.

The switchboard decides; a store only makes its decisions durable. Nothing
here is imported unless the broker opens a journal of that kind.
"""
