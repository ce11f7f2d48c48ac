"""The local Kafka broker's assets: its Maven POM (the Kafka version) and log4j2 config.
The broker's lifecycle is ``recloop.broker``; the topics are ``recloop.topics``."""
