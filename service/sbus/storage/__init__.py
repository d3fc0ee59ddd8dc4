"""Store backends behind :class:`sbus.core.store.Store`."""
