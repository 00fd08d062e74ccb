// Stand-in for the Apple SDK header (compile check only; see README.md).
#pragma once
#include <cstdint>
typedef const void* CFTypeRef;
typedef long CFIndex;
typedef unsigned long CFOptionFlags;
typedef double CFTimeInterval;
typedef double CFAbsoluteTime;
typedef unsigned long CFHashCode;
typedef uint32_t CFStringEncoding;
typedef const struct __CFString* CFStringRef;
typedef const struct __CFURL* CFURLRef;
typedef const struct __CFData* CFDataRef;
typedef const struct __CFDictionary* CFDictionaryRef;
typedef const struct __CFArray* CFArrayRef;
typedef const struct __CFAllocator* CFAllocatorRef;
typedef struct __CFBundle* CFBundleRef;
typedef struct __CFRunLoop* CFRunLoopRef;
typedef struct __CFError* CFErrorRef;
typedef struct {
  CFIndex location;
  CFIndex length;
} CFRange;
typedef CFIndex CFComparisonResult;
