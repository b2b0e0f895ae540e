"""Front doors: protocols in, ``DataPlane`` calls, protocols out. ``api.grpc`` and ``api.http`` never import
each other, and reach the data plane only through ``serving.data_plane``, its views and its request types."""
