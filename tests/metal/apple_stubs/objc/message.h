// Stand-in for the Apple SDK header (compile check only; see README.md).
#pragma once
#include "objc/runtime.h"
