"""Telling every server process that something changed (a program version, audience membership) through
Redis pub/sub. Optional: each subscriber also polls storage, so a lost message or a Redis outage only
delays the news by the polling interval."""
from __future__ import annotations

import logging
import threading

log = logging.getLogger("loyalty.server.fanout")

__all__ = ["RedisListener"]


class RedisListener:
    """A daemon thread subscribed to ``channel``. ``on_connect()`` runs after every (re)subscription (news
    may have been missed while unsubscribed), ``on_message(text)`` for each message (its text, decoded),
    ``on_down(exc)`` when Redis fails (the thread retries every 2 s). ``publish`` never raises: the pollers
    still find the change."""

    def __init__(self, redis_url: str, channel: str, *, name: str, on_message, on_connect=None, on_down=None):
        import redis

        self.channel = channel
        self.client = redis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=5)
        self._on_message = on_message
        self._on_connect = on_connect or (lambda: None)
        self._on_down = on_down or (lambda exc: log.warning("%s: %s", name, exc))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, name=name, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._stop.is_set():
            pubsub = None
            try:
                pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.channel)
                self._on_connect()
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None:
                        data = message.get("data")
                        self._on_message(data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data))
            except Exception as exc:  # noqa: BLE001 - Redis down: polling still finds changes
                self._on_down(exc)
                self._stop.wait(2.0)
            finally:
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception:  # noqa: BLE001
                        pass

    def publish(self, message: str) -> None:
        try:
            self.client.publish(self.channel, message)
        except Exception as exc:  # noqa: BLE001
            log.warning("could not publish on %s: %s", self.channel, exc)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=3)
        try:
            self.client.close()
        except Exception:  # noqa: BLE001
            pass
