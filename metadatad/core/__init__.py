"""The rules of metadatad with no Twisted and no SQL: nodes, the ring, boot mappings,
peer rules, tokens, rate limits and addresses.  Everything else imports this package;
it imports nothing of metadatad's outside itself."""
