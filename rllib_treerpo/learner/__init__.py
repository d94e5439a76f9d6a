"""From trees to an optimizer step: rows and packs, the packed forward, the update, precision, memory."""
