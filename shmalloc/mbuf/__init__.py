"""The mbuf layer: FreeBSD's mbuf zones, ctors/dtors and chain utilities on shmalloc."""
