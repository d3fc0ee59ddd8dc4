"""Store backends behind :class:`sbus.storage.protocol.Store`."""
