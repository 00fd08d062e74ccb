// Stand-in for the Apple SDK header (compile check only; see README.md).
#pragma once
typedef struct __IOSurface* IOSurfaceRef;
